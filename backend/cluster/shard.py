"""One replica of one category group: a Ray actor holding today's index restricted to its group's categories,
built from the database (or its verified cache file) by the actor itself, and following the change log for
its categories itself, so no vector travels through Ray on ingest. Restarted by Ray where it dies."""

import logging
import os
import pickle
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from backend.index.layout import IndexLayout
from backend.search.live_index import LiveIndex
from backend.storage.engine import make_engine
from backend.storage.shards import CategorySet

log = logging.getLogger(__name__)

# A search request (queries, k, categories per query or None, nprobe, shortlist) and its answer (scores, ids,
# scanned) each travel as one pickled bytes: Ray serialises every argument and every numpy array of a call on
# its own, which cost 0.6-0.9 ms of a 3-4 ms fan-out to two shards here (docs/cluster.md, "Measured here").
ShardAnswer = tuple[np.ndarray, np.ndarray, np.ndarray]


# The actors' interface version, part of their names (epochs.py): bump it when a method's signature changes.
PROTOCOL = 2


def pack(value: object) -> bytes:
    """The bytes of a request or an answer; only Ray's own processes exchange them, as Ray pickles anyway."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> Any:
    return pickle.loads(data)  # from a process of the same cluster, as every argument Ray hands over is


class ShardActor:
    def __init__(
        self,
        database_url: str,
        db_timeout_s: float,
        model: str,
        dim: int,
        layout: IndexLayout,
        directory: str,
        categories: CategorySet,
        refresh_s: float,
    ) -> None:
        from sqlalchemy.engine import make_url

        from backend.index.stage1_models import one_blas_thread

        one_blas_thread()  # as the API server does: concurrent calls, each with one BLAS thread
        self.categories = categories
        self.engine = make_engine(make_url(database_url), db_timeout_s)
        self.cache = LiveIndex(self.engine, model, dim, Path(directory), layout, categories)
        self.state = "building"
        self.cache.get()
        self.state = "ready"
        self.started = time.time()
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, args=(refresh_s,), name="follow-change-log", daemon=True)
        self._follower.start()

    def _follow(self, every_s: float) -> None:
        """Other writers' changes (workers, other API servers) within `every_s`, without being asked."""
        while not self._stop.wait(every_s):
            try:
                self.cache.refresh()
            except Exception:  # the database away for a while: searches go on from the index we hold
                log.exception("shard: following the change log failed; retrying")

    def search(self, request: bytes) -> bytes:
        """Stage 2 over the request's categories (per query, category ids, padded with ids no category has;
        None: all this group holds): `pack((queries, k, categories, nprobe, shortlist))` in, the packed
        ShardAnswer out."""
        queries, k, categories, nprobe, shortlist = unpack(request)
        with self.cache.reading() as index:
            positions = None
            if categories is not None:
                lookup = index.list_of
                positions = np.asarray([[lookup.get(int(c), -1) for c in row] for row in categories], dtype=np.int64)
            hits = index.search(queries, k, positions, nprobe, shortlist)
        return pack((hits.scores, hits.ids, hits.scanned))

    def catch_up(self, seq: int) -> int:
        """Apply the change log up to at least `seq` (a writer's own change) before answering."""
        if self.cache.seq < seq:
            self.cache.after_write()
        return self.cache.seq

    def info(self) -> dict[str, Any]:
        import ray

        index = self.cache.loaded
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "state": self.state,
            "vectors": 0 if index is None else index.ntotal,
            "seq": self.cache.seq,
            "origin": self.cache.origin,
        }

    def stop(self) -> None:
        self._stop.set()

    def drop(self) -> None:
        """Retiring (an older epoch's replica, killed next): stop following, then remove the cache directory
        on this node, which nothing else would ever read again."""
        self._stop.set()
        self._follower.join(timeout=30)
        shutil.rmtree(self.cache.directory, ignore_errors=True)
