"""Search, as the CLI and the API ask for it: embed the queries, then `search_vectors` top to bottom: rank
the categories (stage 1), choose those stage 2 searches, search them, let a stored image find itself, fetch
what the database still holds, page. Also an upload through the writer. The live index's start, tick, stop
and rebuilds are `IndexLifecycle`'s (services/index_lifecycle.py); deletes and prototype rebuilds are
`CatalogueWrites`' (services/writes.py)."""

import logging
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import Engine

from backend.core.config import Settings
from backend.core.errors import InvalidInput, NotFound
from backend.core.search_params import SearchParams
from backend.embedding.cache import model_cache
from backend.embedding.embedder import Embedder
from backend.imaging import DecodedImage
from backend.index.category_index import CategoryIndex, SearchHits
from backend.index.layout import IndexLayout, layout_from_settings
from backend.ingest.categories import LiveStage1
from backend.ingest.writer import BatchWriter
from backend.search import filters as search_filters
from backend.search import near_duplicates, own_image
from backend.search.live_index import LiveIndex
from backend.search.results import CategoryScore, Hit, SearchResult, UploadResult
from backend.search.stage1 import Ranking, Stage1
from backend.search.stage2 import InProcessStage2, Stage2
from backend.storage import catalogue
from backend.storage.engine import get_engine, session_scope
from backend.telemetry import EMBED_IMAGES, EMBED_SECONDS, SEARCH_STAGE_SECONDS

log = logging.getLogger(__name__)


def open_stage2(settings: Settings, engine: Engine, model: str, dim: int, layout: IndexLayout) -> Stage2:
    """Who runs stage 2: this process (RAY_ADDRESS unset) or a Ray cluster's shard actors."""
    if not settings.ray_address:
        return InProcessStage2()
    from backend.cluster.router import RayStage2  # Ray is an optional extra (requirements-cluster.txt)

    return RayStage2(settings, engine, model, dim, layout)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass
class _Searched:
    """What the index said, read under its lock: everything a page needs afterwards."""

    ranking: Ranking
    categories: np.ndarray | None  # per query, the category numbers stage 2 searched; None: all
    hits: SearchHits
    outside: list[list[tuple[int, float]]]  # per query, own-image candidates outside those categories
    total: int
    category_ids: list[int]
    seconds: dict[str, float]  # "prototypes" (stage 1), "search" (stage 2), "own_image" (its probe, when it ran)
    left_out: list[list[int]]  # per query, categories of shard groups that missed the deadline


class SearchService:
    def __init__(self, settings: Settings, engine: Engine | None = None, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.engine = engine or get_engine()
        self.embedder = embedder or model_cache.get(settings)
        self.layout = layout_from_settings(settings, self.embedder.dim)
        self.cache = LiveIndex(self.engine, self.embedder.model_id, self.embedder.dim, settings.index_dir, self.layout)
        self.stage1 = Stage1(self.engine, self.embedder.model_id, self.embedder.dim, settings.stage1)
        self._names: dict[int, str] = {}
        self._stage2: Stage2 | None = None

    @property
    def stage2(self) -> Stage2:
        """Who runs stage 2: this process over the live index, or a Ray cluster's shards (RAY_ADDRESS)."""
        if self._stage2 is None:
            self._stage2 = open_stage2(self.settings, self.engine, self.model, self.embedder.dim, self.layout)
        return self._stage2

    def close(self) -> None:
        """Stage 2's own threads stopped (a cluster router's epoch follower), when it was opened."""
        if self._stage2 is not None:
            self._stage2.close()

    @property
    def model(self) -> str:
        return self.embedder.model_id

    @property
    def image_size(self) -> int:
        """The side the model's input images are resized to (query images are decoded for it)."""
        return self.embedder.image_size

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
        k = search_filters.depth(params, 1 if exclude is not None else 0)
        wanted = search_filters.category_filter(self.engine, params.categories)
        t = time.perf_counter()
        same = self._stored_copies(queries, images)  # before the lock: no connection is held waiting for it
        lookup = time.perf_counter() - t
        with self.cache.reading() as index:
            searched = self._search_index(index, queries, params, wanted, k, images, same)
        t = time.perf_counter()
        ranked, meta = self._fetch(queries, searched, exclude, images, same, k)
        searched.seconds["fetch"] = time.perf_counter() - t + lookup  # every database read of the search
        n = len(queries)
        for stage, seconds in searched.seconds.items():
            SEARCH_STAGE_SECONDS.labels(stage).observe(seconds / n)
        allowed = None if wanted is None else set(wanted)  # an own image outside a category filter is not shown
        return [self._page(searched, q, ranked[q], meta, params, allowed) for q in range(n)]

    def _stored_copies(self, queries: np.ndarray, images: list[own_image.QueryImage] | None) -> list[tuple[int, float] | None]:
        """Per query, the stored image with its very bytes and its score (`own_image.same_bytes`)."""
        if not images or not any(im.sha256 for im in images):
            return [None] * len(queries)
        with session_scope(self.engine, single_read=True) as session:
            return own_image.same_bytes(session, self.model, queries, images)

    def _search_index(
        self,
        index: CategoryIndex,
        queries: np.ndarray,
        params: SearchParams,
        wanted: list[int] | None,
        k: int,
        images: list[own_image.QueryImage] | None,
        same: list[tuple[int, float] | None],
    ) -> _Searched:
        """Under the index's read lock: rank (stage 1), choose the categories, search them (stage 2), and the
        own-image probe for the queries whose bytes are not stored."""
        t0 = time.perf_counter()
        ranking = self.stage1.rank(index, queries)
        t1 = time.perf_counter()
        chosen = search_filters.stage_two_categories(ranking.positions, index.list_of, wanted, params)
        found = self.stage2.search(index, queries, k, chosen, params.nprobe, self.settings.rerank_candidates)
        t2 = time.perf_counter()
        seconds = {"prototypes": t1 - t0, "search": t2 - t1}
        outside: list[list[tuple[int, float]]] = [[] for _ in queries]
        need = [copy is None for copy in same]
        if chosen is not None and images is not None and any(need):  # stage 2 left categories out
            top, positions = params.top_categories, ranking.positions
            outside = own_image.probe_outside(self.stage1, index, queries, positions, top, params.nprobe, need)
            seconds["own_image"] = time.perf_counter() - t2
        return _Searched(ranking, chosen, found.hits, outside, index.ntotal, index.category_ids, seconds, found.left_out)

    def _fetch(
        self,
        queries: np.ndarray,
        searched: _Searched,
        exclude: int | None,
        images: list[own_image.QueryImage] | None,
        same: list[tuple[int, float] | None],
        k: int,
    ) -> tuple[list[list[tuple[int, float]]], dict]:
        """Per query the ranked (id, score) pairs with a stored image first, and the rows' category and label."""
        # One connection, no transaction: each SELECT is consistent on its own, and the last one, the
        # database's word on which hits still exist, is what a result may show.
        with session_scope(self.engine, single_read=True) as session:
            ranked = own_image.results(session, queries, searched.hits, exclude, searched.outside, images, same, k)
            meta = catalogue.result_metadata(session, {i for hits_q in ranked for i, _ in hits_q})
        return ranked, meta

    def _page(
        self,
        searched: _Searched,
        q: int,
        ranked: list[tuple[int, float]],
        meta: dict,
        params: SearchParams,
        allowed: set[int] | None,
    ) -> SearchResult:
        """Query q's page of hits that still exist (in the `allowed` categories, when a filter names them), its
        ranked categories and its share of the timings."""
        ids = np.asarray([i for i, _ in ranked], dtype=np.int64)
        scores = np.asarray([sc for _, sc in ranked], dtype=np.float32)
        results = [
            Hit(image_id, self._name(meta[image_id][0]), meta[image_id][1], score, rank)
            for rank, image_id, score in search_filters.page(
                scores, ids, lambda i: i in meta and (allowed is None or meta[i][0] in allowed), params
            )
        ]
        cats = searched.categories
        chosen = set(cats[q].tolist()) if cats is not None else set(range(len(searched.category_ids)))
        n = len(searched.hits.scanned)
        timings = {stage: _ms(seconds / n) for stage, seconds in searched.seconds.items()}
        timings["total"] = round(sum(timings.values()), 3)
        use_prototypes = params.use_prototypes
        return SearchResult(
            results,
            self._ranking(searched.category_ids, searched.ranking, q, chosen),
            use_prototypes,
            params.top_categories if use_prototypes else None,
            int(searched.hits.scanned[q]),
            searched.total,
            timings,
            partial=[self._name(c) or str(c) for c in searched.left_out[q]],
        )

    def stage1_ranking(self, images: list[PILImage.Image]) -> tuple[list[list[CategoryScore]], dict[str, float]]:
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

    # --- an upload: one database transaction, then the index follows before the answer -----------

    def upload(
        self, image: DecodedImage, category: str | None, description: str | None = None, refuse_near_duplicates: bool = False
    ) -> UploadResult:
        """One image through the batch writer in one call (a named category must exist; none: stage 1 predicts
        one), its near-duplicate links stored in the same transaction, then searchable before the answer."""
        writer = BatchWriter(
            self.engine, self.embedder, LiveStage1(self.cache, self.stage1), self.settings.max_image_pixels, new_categories=False
        )
        near = near_duplicates.UploadLinks(
            self.cache, self.engine, near_duplicates.LinkSearch.of(self.settings), refuse_near_duplicates
        )
        done = writer.upload(image, category, description, near)
        if done.embed_seconds:
            EMBED_SECONDS.observe(done.embed_seconds)
            EMBED_IMAGES.inc()
        if done.item is None:
            if done.report.failures:
                raise InvalidInput(f"{done.report.failures[0]['reason']} with the upload")
            return self._duplicate(image.sha256)  # the same bytes are stored (maybe concurrently)
        self.follow_write()  # committed: searchable before the answer
        item, p = done.item, done.item.prediction
        score, probability = (None, None) if p is None else (p.score, p.probability)
        return UploadResult(done.report.ids[0], self._name(item.category_id), p is None, False, score, probability, near.hits)

    def _duplicate(self, sha256: str) -> UploadResult:
        with session_scope(self.engine) as session:
            stored = catalogue.get_image(session, catalogue.existing_by_sha(session, [sha256])[sha256])
            return UploadResult(stored.id, self._name(stored.category_id), stored.label_given, duplicate=True)

    def follow_write(self) -> None:
        """This process's index, then stage 2 wherever it runs, reflect what was just committed."""
        self.cache.after_write()
        self.stage2.catch_up(self.cache.seq)
