"""The search engine as one object: embedder + database + index cache; search, writes and the index's
start/tick/stop, shared by the CLI and the API. The index's lifecycle (load, verify, rebuild, follow changes,
locking) is `backend.search.live_index`'s."""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backend.core.config import Settings
from backend.core.errors import Conflict, InvalidInput, NotFound
from backend.core.search_params import SearchParams
from backend.embedding.cache import model_cache
from backend.embedding.embedder import Embedder
from backend.imaging import DecodedImage
from backend.index.layout import layout_from_settings
from backend.index.two_stage import TwoStageIndex
from backend.ingest.categories import LiveStage1
from backend.ingest.writer import BatchWriter
from backend.schemas import Status
from backend.search import filters as search_filters
from backend.search import near_duplicates, own_image
from backend.search.live_index import IndexCache, prune_change_log
from backend.search.results import CategoryScore, Hit, SearchResult, UploadResult
from backend.search.stage1 import Ranking, Stage1
from backend.search.stage2 import Stage2, open_stage2
from backend.services.status import build_status
from backend.storage import catalogue
from backend.storage.engine import get_engine, session_scope
from backend.storage.schema import Image
from backend.telemetry import EMBED_IMAGES, EMBED_SECONDS, SEARCH_STAGE_SECONDS

log = logging.getLogger(__name__)
T = TypeVar("T")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class SearchService:
    def __init__(self, settings: Settings, engine: Engine | None = None, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.engine = engine or get_engine()
        self.embedder = embedder or model_cache.get(settings)
        self.layout = layout_from_settings(settings, self.embedder.dim)
        self.cache = IndexCache(self.engine, self.embedder.model_id, self.embedder.dim, settings.index_dir, self.layout)
        self.stage1 = Stage1(self.engine, self.embedder.model_id, self.embedder.dim, settings.stage1)
        self._names: dict[int, str] = {}
        self._stage2: Stage2 | None = None

    @property
    def stage2(self) -> Stage2:
        """Who runs stage 2: this process over the live index, or a Ray cluster's shards (RAY_ADDRESS)."""
        if self._stage2 is None:
            self._stage2 = open_stage2(self.settings, self.engine, self.model, self.embedder.dim, self.layout)
        return self._stage2

    @property
    def model(self) -> str:
        return self.embedder.model_id

    # --- search ----------------------------------------------------------------------------

    def embed(self, images: list[PILImage.Image]) -> np.ndarray:
        with EMBED_SECONDS.time():
            vectors = self.embedder.embed(images)
        EMBED_IMAGES.inc(len(images))
        return vectors

    def search(self, images: list[PILImage.Image], params: SearchParams, sha256s: list[str] | None = None) -> list[SearchResult]:
        """`sha256s`: the queries' bytes' digests, so that a stored image finds itself (backend/search/own_image.py)."""
        start = time.perf_counter()
        queries = self.embed(images)
        embed_s = time.perf_counter() - start
        results = self.search_vectors(queries, params, images=own_image.query_images(images, sha256s))
        for r in results:
            r.timings_ms["embed"] = _ms(embed_s / len(results))
            r.timings_ms["total"] = round(r.timings_ms["total"] + r.timings_ms["embed"], 3)
        return results

    def search_vectors(
        self,
        queries: np.ndarray,
        params: SearchParams,
        exclude: int | None = None,
        images: list[own_image.QueryImage] | None = None,
    ) -> list[SearchResult]:
        """`images`: the query images, so that a stored image finds itself first (backend/search/own_image.py)."""
        top_categories, use_prototypes = params.top_categories, params.use_prototypes
        k = search_filters.depth(params, 1 if exclude is not None else 0)
        wanted = search_filters.category_filter(self.engine, params.categories)
        with self.cache.reading() as index:
            t0 = time.perf_counter()
            ranking = self.stage1.rank(index, queries)
            t1 = time.perf_counter()
            searched = search_filters.stage_two_categories(ranking.positions, index.list_of, wanted, params)
            stage2 = self.stage2.search(index, queries, k, searched, params.nprobe, self.settings.rerank_candidates)
            hits = stage2.hits
            outside: list[list[tuple[int, float]]] = [[] for _ in queries]
            if searched is not None and images is not None:
                probe = own_image.probe_categories(self.stage1, index, queries, ranking, top_categories)
                outside = own_image.nearest_outside(index, queries, probe, params.nprobe)
            t2 = time.perf_counter()
            total = index.ntotal
            category_ids = index.category_ids
        n = len(queries)
        # One connection, no transaction: each SELECT is consistent on its own, and the last one, the
        # database's word on which hits still exist, is what a result may show.
        with session_scope(self.engine, single_read=True) as session:
            ranked = own_image.results(session, self.model, queries, hits, exclude, outside, images, k)
            meta = catalogue.result_metadata(session, {i for hits_q in ranked for i, _ in hits_q})
        t3 = time.perf_counter()
        for stage, seconds in (("prototypes", t1 - t0), ("search", t2 - t1), ("fetch", t3 - t2)):
            SEARCH_STAGE_SECONDS.labels(stage).observe(seconds / n)
        out = []
        for q in range(n):
            ids = np.asarray([i for i, _ in ranked[q]], dtype=np.int64)
            scores = np.asarray([sc for _, sc in ranked[q]], dtype=np.float32)
            results = [
                Hit(image_id, self._name(meta[image_id][0]), meta[image_id][1], score, rank)
                for rank, image_id, score in search_filters.page(scores, ids, lambda i: i in meta, params)
            ]
            chosen = set(searched[q].tolist()) if searched is not None else set(range(len(category_ids)))
            categories = self._ranking(category_ids, ranking, q, chosen)
            timings = {"prototypes": _ms((t1 - t0) / n), "search": _ms((t2 - t1) / n), "fetch": _ms((t3 - t2) / n)}
            timings["total"] = round(sum(timings.values()), 3)
            out.append(
                SearchResult(
                    results,
                    categories,
                    use_prototypes,
                    top_categories if use_prototypes else None,
                    int(hits.scanned[q]),
                    total,
                    timings,
                    partial=[self._name(c) or str(c) for c in stage2.left_out[q]],
                )
            )
        return out

    def rank_categories(self, images: list[PILImage.Image]) -> tuple[list[list[CategoryScore]], dict[str, float]]:
        """Stage 1 only: every category ranked by the active stage-1 ranker, with its probability."""
        t0 = time.perf_counter()
        queries = self.embed(images)
        t1 = time.perf_counter()
        with self.cache.reading() as index:
            ranking = self.stage1.rank(index, queries)
            ids = index.category_ids
        t2 = time.perf_counter()
        rankings = [self._ranking(ids, ranking, q, set()) for q in range(len(queries))]
        return rankings, {"embed": _ms(t1 - t0), "prototypes": _ms(t2 - t1), "total": _ms(t2 - t0)}

    def _ranking(self, category_ids: list[int], ranking: Ranking, q: int, searched: set[int]) -> list[CategoryScore]:
        """Query q's stage-1 result as named categories, best first; `searched` holds category numbers."""
        probabilities = ranking.probabilities[q] if ranking.probabilities is not None else [None] * len(ranking.scores[q])
        return [
            CategoryScore(
                category_ids[p],
                self._name(category_ids[p]) or "",
                float(s),
                int(p) in searched,
                None if pr is None else float(pr),
            )
            for s, p, pr in zip(ranking.scores[q], ranking.positions[q], probabilities, strict=True)
            if p >= 0
        ]

    def similar_to(self, image_id: int, params: SearchParams) -> SearchResult:
        with session_scope(self.engine) as session:
            catalogue.get_image(session, image_id)
            vector = catalogue.image_vector(session, image_id, self.model)
        if vector is None:
            raise NotFound(f"image {image_id} has no {self.model} embedding (run build-index)")
        return self.search_vectors(vector[None, :], params, exclude=image_id)[0]

    def _name(self, category_id: int | None) -> str | None:
        if category_id is None or category_id < 0:
            return None
        if category_id not in self._names:
            with session_scope(self.engine) as session:
                self._names = {cid: name for name, cid in catalogue.category_ids(session).items()}
        return self._names.get(category_id)

    # --- writes: one database transaction, then the index follows before the answer -------------

    def upload(
        self, image: DecodedImage, category: str | None, description: str | None = None, refuse_near_duplicates: bool = False
    ) -> UploadResult:
        """One image through the batch writer (a named category must exist; none: stage 1 predicts one), then
        searchable before the answer."""
        writer = BatchWriter(
            self.engine, self.embedder, LiveStage1(self.cache, self.stage1), self.settings.max_image_pixels, new_categories=False
        )
        batch = writer.unseen(writer.decoded(image, category, description))
        if not batch.items:
            return self._duplicate(image.sha256)
        with EMBED_SECONDS.time():
            vectors = writer.vectorise(batch).vectors
        assert vectors is not None
        EMBED_IMAGES.inc()
        near = near_duplicates.of_vector(self, vectors[0])
        if near and refuse_near_duplicates:
            found = ", ".join(f"{h.image_id} (cosine {h.score:.3f})" for h in near[:5])
            raise Conflict(f"near-duplicate of stored images {found}; not stored (on_near_duplicate=refuse)")
        report = writer.write(batch)
        if report.failures:
            raise InvalidInput(f"{report.failures[0]['reason']} with the upload")
        if not report.ids:  # the same bytes were stored concurrently
            return self._duplicate(image.sha256)
        self._follow_write()  # committed: searchable before the answer
        item, p = batch.items[0], batch.items[0].prediction
        score, probability = (None, None) if p is None else (p.score, p.probability)
        return UploadResult(report.ids[0], self._name(item.category_id), p is None, False, score, probability, near)

    def _duplicate(self, sha256: str) -> UploadResult:
        with session_scope(self.engine) as session:
            stored = catalogue.get_image(session, catalogue.existing_by_sha(session, [sha256])[sha256])
            return UploadResult(stored.id, self._name(stored.category_id), stored.label_given, duplicate=True)

    def delete(self, image_id: int) -> Image:
        return self._write(lambda session: catalogue.delete_image(session, image_id))

    def refresh(self) -> None:
        """The server's tick: follow other processes' changes, then let stage 1 check whether to retrain."""
        self.cache.refresh()
        self.stage1.refresh(self.cache.seq)

    def rebuild_index(self, reason: str) -> TwoStageIndex:
        """A full rebuild of the index, then stage 1 retrained on the given labels (build-index)."""
        index = self.cache.rebuild(reason)
        if self.settings.stage1 != "prototype":
            self.stage1.retrain()
        return index

    def rebuild_prototypes(self) -> int:
        return self._write(lambda session: catalogue.rebuild_prototypes(session, self.model))

    def _write(self, change: Callable[[Session], T]) -> T:
        """Commit the change, then bring the index up to date with the database (this change included)
        before answering: an acknowledged write is searchable, whatever rebuild runs meanwhile."""
        with session_scope(self.engine) as session:
            result = change(session)
        self._follow_write()
        return result

    def _follow_write(self) -> None:
        """This process's index, then stage 2 wherever it runs, reflect what was just committed."""
        self.cache.after_write()
        self.stage2.catch_up(self.cache.seq)

    # --- the index and the model, for the server's start, tick and stop ----------------------

    @property
    def image_size(self) -> int:
        """The side the model's input images are resized to (query images are decoded for it)."""
        return self.embedder.image_size

    @property
    def model_loaded(self) -> bool:
        return self.embedder.loaded

    @property
    def index_origin(self) -> str:
        """How the live index came to be: loaded from cache, rebuilt (and why)."""
        return self.cache.origin

    def load(self) -> None:
        """Load the model and the index (before the first request, or before a CLI status)."""
        self.embedder.load()
        self.cache.get()
        _ = self.stage2  # a cluster's shards are found or started before the first request

    def sync_index(self) -> int:
        """Bring the index up to date with the database; the newest change it then reflects."""
        self.cache.get()
        return self.cache.seq

    def index_is_current(self) -> bool:
        return self.cache.is_current()

    def save_index(self) -> None:
        """Save the index cache: the next start loads it and applies only later changes."""
        self.cache.save()

    def prune_change_log(self, keep_days: float) -> int:
        return prune_change_log(self.engine, keep_days)

    def after_write(self) -> None:
        """Another writer in this process (the in-process worker) committed: the index follows."""
        self._follow_write()

    def status(self) -> Status:
        return build_status(self.settings, self.engine, self.embedder, self.cache, self.stage1, self.stage2)
