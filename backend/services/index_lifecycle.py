"""The live index's lifecycle for the server's start, tick and stop and for the CLI: load, follow other
processes' changes, rebuild, save, and what /status reports. Searching is `SearchService`'s; the index's
own mechanics (verify, rebuild, follow the change log, locking) are `backend.search.live_index`'s."""

import logging
from collections.abc import Callable

from sqlalchemy import Engine

from backend.core.config import Settings
from backend.embedding.embedder import Embedder
from backend.index.category_index import CategoryIndex
from backend.schemas import Status
from backend.search import near_duplicates
from backend.search.live_index import LiveIndex, prune_change_log
from backend.search.stage1 import Stage1
from backend.search.stage2 import InProcessStage2, Stage2
from backend.services.status import build_status

log = logging.getLogger(__name__)


class IndexLifecycle:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        embedder: Embedder,
        cache: LiveIndex,
        stage1: Stage1,
        stage2: Callable[[], Stage2] = InProcessStage2,
    ) -> None:
        """`stage2`: who runs stage 2 (made on first use: a cluster is only reached when something asks)."""
        self.settings, self.engine, self.embedder, self.cache, self.stage1 = settings, engine, embedder, cache, stage1
        self.stage2 = stage2
        self._links_through = -1  # the index's seq at which the last link step found nothing left to link

    @property
    def model(self) -> str:
        return self.embedder.model_id

    @property
    def model_loaded(self) -> bool:
        return self.embedder.loaded

    @property
    def index_origin(self) -> str:
        """How the live index came to be: loaded from cache, rebuilt (and why)."""
        return self.cache.origin

    def load(self) -> None:
        """Load the model, the index and stage 1's stored ranker (before the first request, or before a CLI
        status): at 1M images, reading the ranker in the first request made the first /status take 121 ms."""
        self.embedder.load()
        self.cache.get()
        if self.stage1.setting != "prototype":
            self.stage1.load()
        self.stage2()  # a cluster's shards are found or started before the first request

    def refresh(self) -> None:
        """The server's tick: follow other processes' changes, then let stage 1 check whether to retrain, then
        link a chunk of the images stored without near-duplicate links."""
        self.cache.refresh()
        self.stage1.refresh(self.cache.seq)
        self.link_duplicates()

    def link_duplicates(self) -> near_duplicates.LinkProgress:
        """Near-duplicate links for the next chunk of images stored without them (the tick; the backfill)."""
        seq = self.cache.seq
        if seq == self._links_through:  # nothing stored since links caught up with the index: no query at all
            return near_duplicates.LinkProgress(0, 0, seq, 0)
        how = near_duplicates.LinkSearch.of(self.settings)
        done = near_duplicates.link_chunk(self.cache, how, self.settings.near_duplicate_link_chunk)
        if done.as_of_seq >= seq:  # links can go no further than the index: caught up until it moves
            self._links_through = seq
        if done.linked:
            log.info("near-duplicate links: %d images linked (%d new links), %d behind", done.linked, done.links, done.behind)
        return done

    def sync_index(self) -> int:
        """Bring the index up to date with the database; the newest change it then reflects."""
        self.cache.get()
        return self.cache.seq

    def index_is_current(self) -> bool:
        return self.cache.is_current()

    def rebuild_index(self, reason: str) -> CategoryIndex:
        """A full rebuild of the index, then stage 1 retrained on the given labels (build-index)."""
        index = self.cache.rebuild(reason)
        if self.settings.stage1 != "prototype":
            self.stage1.retrain()
        return index

    def save_index(self) -> None:
        """Save the index cache: the next start loads it and applies only later changes."""
        self.cache.save()

    def prune_change_log(self, keep_days: float) -> int:
        return prune_change_log(self.engine, keep_days)

    def status(self) -> Status:
        return build_status(self.settings, self.engine, self.embedder, self.cache, self.stage1, self.stage2())
