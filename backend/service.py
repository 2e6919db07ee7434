"""The search engine as one object: embedder + database + index cache; search, writes and status, shared by
the CLI and the API. The index's lifecycle (load, verify, rebuild, follow changes, locking) is
`backend.index.cache`'s."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeVar

import numpy as np
from PIL import Image as PILImage
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backend import near_duplicates, search_filters
from backend.core import search_params
from backend.core.config import Settings
from backend.core.errors import Conflict, InvalidInput, NotFound
from backend.core.search_params import SearchParams
from backend.embedding.cache import model_cache
from backend.embedding.embedder import Embedder
from backend.imaging import DecodedImage
from backend.index import own_image
from backend.index.cache import IndexCache
from backend.index.layout import layout_from_settings
from backend.index.stage1 import Ranking, Stage1, Stage1Status
from backend.index.two_stage import TwoStageIndex
from backend.ingest.categories import LiveStage1
from backend.ingest.writer import BatchWriter
from backend.storage import catalogue
from backend.storage.engine import get_engine, location, session_scope
from backend.storage.schema import Image
from backend.telemetry import EMBED_IMAGES, EMBED_SECONDS, SEARCH_STAGE_SECONDS

log = logging.getLogger(__name__)
T = TypeVar("T")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass
class Hit:
    image_id: int
    category: str | None
    label_given: bool
    score: float
    rank: int


@dataclass
class CategoryScore:
    category_id: int
    category: str
    score: float  # stage 1's score: cosine similarity (prototype, centroids) or logit (classifier)
    searched: bool
    probability: float | None = None  # calibrated on held-out labels; None while no ranker is trained


@dataclass
class SearchResult:
    results: list[Hit]
    categories: list[CategoryScore]
    use_prototypes: bool
    top_categories: int | None
    vectors_scanned: int
    vectors_total: int
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def searched_categories(self) -> list[str]:
        return [c.category for c in self.categories if c.searched]


@dataclass
class UploadResult:
    image_id: int
    category: str | None
    label_given: bool
    duplicate: bool
    category_score: float | None = None
    category_probability: float | None = None
    near_duplicates: list[Hit] = field(default_factory=list)  # stored images at or above NEAR_DUPLICATE_THRESHOLD


class ModelStatus(BaseModel):
    id: str
    name: str
    dim: int
    device: str
    runtime: str
    loaded: bool


class CategoryCount(BaseModel):
    id: int
    name: str
    images: int
    labelled: int  # images whose label was given, not predicted


class DatabaseStatus(BaseModel):
    server: str  # which database is in use: the embedded one, or the URL without its password
    images: int
    vectors_for_model: int
    vectors_by_model: dict[str, int]
    categories: list[CategoryCount]


class RefreshStatus(BaseModel):
    kind: Literal["none", "incremental", "full"]
    added: int
    removed: int
    seconds: float
    reason: str
    at: datetime


class IndexStatus(BaseModel):
    type: str  # the live index's type (FAISS_INDEX_TYPE=auto: flat or fastscan, by catalogue size)
    why: str  # why it has that type
    codec: str
    rerank: str  # none, or the copy a shortlist is re-scored from
    lists: int  # inverted lists: one per category (flat) or k-means sub-lists (ivf)
    default_nprobe: int
    loaded: bool
    origin: str  # how the live index came to be: loaded from cache, rebuilt (and why)
    vectors: int
    categories: int
    current: bool  # reflects every change committed to the database
    watermark: int  # the newest database change it reflects
    memory_bytes: int  # vector codes, ids, centroids and prototypes held by the index
    retrain: list[str]  # why the next rebuild (build-index) would train it differently; empty when it would not
    refreshes: dict[str, int]  # incremental and full refreshes since start
    last_refresh: RefreshStatus | None


class SearchSettings(BaseModel):
    use_prototype_filtering: bool
    default_top_categories: int
    default_search_limit: int
    bounds: dict[str, dict[str, int | float]]


class Status(BaseModel):
    model: ModelStatus
    database: DatabaseStatus
    index: IndexStatus
    stage1: Stage1Status
    settings: SearchSettings


class SearchService:
    def __init__(self, settings: Settings, engine: Engine | None = None, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.engine = engine or get_engine()
        self.embedder = embedder or model_cache.get(settings)
        layout = layout_from_settings(settings, self.embedder.dim)
        self.cache = IndexCache(self.engine, self.embedder.model_id, self.embedder.dim, settings.index_dir, layout)
        self.stage1 = Stage1(self.engine, self.embedder.model_id, self.embedder.dim, settings.stage1)
        self._names: dict[int, str] = {}

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
        """`sha256s`: the queries' bytes' digests, so that a stored image finds itself (backend/index/own_image.py)."""
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
        """`images`: the query images, so that a stored image finds itself first (backend/index/own_image.py)."""
        top_categories, use_prototypes = params.top_categories, params.use_prototypes
        k = search_filters.depth(params, 1 if exclude is not None else 0)
        wanted = search_filters.category_filter(self.engine, params.categories)
        with self.cache.reading() as index:
            t0 = time.perf_counter()
            ranking = self.stage1.rank(index, queries)
            t1 = time.perf_counter()
            searched = search_filters.stage_two_categories(ranking.positions, index.list_of, wanted, params)
            hits = index.search(queries, k, searched, params.nprobe, self.settings.rerank_candidates)
            outside: list[list[tuple[int, float]]] = [[] for _ in queries]
            if searched is not None and images is not None:
                probe = own_image.probe_categories(self.stage1, index, queries, ranking, top_categories)
                outside = own_image.nearest_outside(index, queries, probe, params.nprobe)
            t2 = time.perf_counter()
            total = index.ntotal
            category_ids = index.category_ids
        n = len(queries)
        ranked = own_image.results(self.engine, self.model, queries, hits, exclude, outside, images, k)
        with session_scope(self.engine, single_read=True) as session:  # the database says which hits still exist
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
        self.cache.after_write()  # committed: searchable before the answer
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
        self.stage1.refresh(self.cache.watermark)

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
        self.cache.after_write()
        return result

    # --- status ----------------------------------------------------------------------------

    def status(self) -> Status:
        with session_scope(self.engine) as session:
            counts = catalogue.category_counts(session)
            models = dict(catalogue.model_ids(session))
        cache = self.cache
        index = cache.loaded
        last = cache.last_refresh
        return Status(
            model=ModelStatus(
                id=self.model,
                name=self.embedder.name,
                dim=self.embedder.dim,
                device=str(self.embedder.device),
                runtime=self.embedder.runtime,
                loaded=self.embedder.loaded,
            ),
            database=DatabaseStatus(
                server=location(self.settings, self.engine),
                images=sum(c[2] for c in counts),
                vectors_for_model=models.get(self.model, 0),
                vectors_by_model=models,
                categories=[CategoryCount(id=cid, name=name, images=n, labelled=given) for cid, name, n, given in counts],
            ),
            index=IndexStatus(
                **cache.layout_status(),
                lists=int(index.ivf.nlist) if index else 0,
                default_nprobe=self.settings.faiss_nprobe,
                retrain=index.needs_retraining() if index else [],
                loaded=index is not None,
                origin=cache.origin,
                vectors=index.ntotal if index else 0,
                categories=len(index.category_ids) if index else 0,
                current=cache.is_current(),
                watermark=cache.watermark,
                memory_bytes=cache.memory_bytes(),
                refreshes=dict(cache.refreshes),
                last_refresh=RefreshStatus(**vars(last)) if last else None,
            ),
            settings=SearchSettings(
                use_prototype_filtering=self.settings.use_prototype_filtering,
                default_top_categories=self.settings.default_top_categories,
                default_search_limit=self.settings.default_search_limit,
                bounds=search_params.bounds(),
            ),
            stage1=self.stage1.status(),
        )
