"""The search engine as one object: embedder + database + two-stage index, shared by the CLI and the API."""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend import catalogue
from backend.core.config import Settings
from backend.core.errors import InvalidInput, NotFound, Unprocessable
from backend.core.locks import ReadWriteLock
from backend.db.models import Image
from backend.db.session import get_engine, session_scope
from backend.embedding.base import Embedder
from backend.embedding.registry import create_embedder
from backend.imaging import DecodedImage
from backend.index import TwoStageIndex

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
    score: float
    searched: bool


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


class SearchService:
    def __init__(self, settings: Settings, engine: Engine | None = None, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.engine = engine or get_engine()
        self.embedder = embedder or create_embedder(settings)
        self._index: TwoStageIndex | None = None
        self._lock = ReadWriteLock()
        self._build_lock = threading.Lock()
        self._names: dict[int, str] = {}
        self.index_origin = "not loaded"

    @property
    def model(self) -> str:
        return self.embedder.model_id

    # --- the index as a cache of the database ----------------------------------------------

    def _fingerprint(self) -> dict[str, int]:
        with session_scope(self.engine) as session:
            return catalogue.state_fingerprint(session, self.model)

    def _build_from_db(self) -> TwoStageIndex:
        """Never re-embeds: reads stored vectors and prototype sums."""
        with session_scope(self.engine) as session:
            state = catalogue.state_fingerprint(session, self.model)
            stored = catalogue.load_vectors(session, self.model)
            prototypes = catalogue.load_prototypes(session, self.model)
            category_ids = sorted(catalogue.category_ids(session).values())
        index = TwoStageIndex.build(self.model, self.embedder.dim, category_ids, stored, prototypes)
        index.state = state
        return index

    def ensure_index(self, force_rebuild: bool = False) -> TwoStageIndex:
        """Load the saved index if it matches the database, else rebuild it from stored vectors and save."""
        if self._index is not None and not force_rebuild:
            return self._index  # the common case, without taking the lock
        with self._build_lock:
            if self._index is not None and not force_rebuild:
                return self._index
            index = None if force_rebuild else TwoStageIndex.load(self.settings.index_dir, self.model)
            if index is not None and index.state == self._fingerprint():
                origin = "loaded from cache"
            else:
                start = time.perf_counter()
                index = self._build_from_db()
                index.save(self.settings.index_dir)
                origin = f"rebuilt from database in {time.perf_counter() - start:.2f}s"
            with self._lock.write():
                self._index = index
            self.index_origin = origin
            self._refresh_names()
            log.info("index for %s: %d vectors, %s", self.model, index.ntotal, origin)
            return index

    def save_index(self) -> None:
        with self._lock.read():
            if self._index is not None:
                self._index.save(self.settings.index_dir)

    def index_is_current(self) -> bool:
        return self._index is not None and self._index.state == self._fingerprint()

    def refresh_if_stale(self) -> bool:
        """Rebuild from the database when another process changed it; True if it did."""
        if self.index_is_current():
            return False
        self.ensure_index(force_rebuild=True)
        return True

    def _refresh_names(self) -> None:
        with session_scope(self.engine) as session:
            self._names = {cid: name for name, cid in catalogue.category_ids(session).items()}

    # --- search ----------------------------------------------------------------------------

    def embed(self, images: list[PILImage.Image]) -> np.ndarray:
        return self.embedder.embed(images)

    def search(self, images: list[PILImage.Image], limit: int, top_categories: int, use_prototypes: bool) -> list[SearchResult]:
        start = time.perf_counter()
        queries = self.embed(images)
        embed_s = time.perf_counter() - start
        results = self.search_vectors(queries, limit, top_categories, use_prototypes)
        for r in results:
            r.timings_ms["embed"] = _ms(embed_s / len(results))
            r.timings_ms["total"] = round(r.timings_ms["total"] + r.timings_ms["embed"], 3)
        return results

    def search_vectors(
        self, queries: np.ndarray, limit: int, top_categories: int, use_prototypes: bool, exclude: int | None = None
    ) -> list[SearchResult]:
        if not 1 <= limit <= 1000:
            raise Unprocessable("limit must be between 1 and 1000")
        if not 1 <= top_categories:
            raise Unprocessable("top_categories must be at least 1")
        index = self.ensure_index()
        k = limit + (1 if exclude is not None else 0)
        with self._lock.read():
            t0 = time.perf_counter()
            cat_scores, cat_lists = index.rank_categories(queries)
            t1 = time.perf_counter()
            searched = cat_lists[:, :top_categories] if use_prototypes else None
            hits = index.search(queries, k, searched)
            t2 = time.perf_counter()
            total = index.ntotal
            category_ids = index.category_ids
            with session_scope(self.engine) as session:
                meta = catalogue.result_metadata(session, {int(i) for i in hits.ids.ravel() if i >= 0})
            t3 = time.perf_counter()
        n = len(queries)
        out = []
        for q in range(n):
            results: list[Hit] = []
            for score, raw_id in zip(hits.scores[q], hits.ids[q], strict=True):
                image_id = int(raw_id)
                if image_id < 0 or image_id == exclude or image_id not in meta or len(results) == limit:
                    continue
                cid, given = meta[image_id]
                results.append(Hit(image_id, self._name(cid), given, float(score), len(results) + 1))
            chosen = set(searched[q].tolist()) if searched is not None else set(range(len(category_ids)))
            categories = self._ranking(category_ids, cat_scores[q], cat_lists[q], chosen)
            timings = {
                "prototypes": _ms((t1 - t0) / n),
                "search": _ms((t2 - t1) / n),
                "fetch": _ms((t3 - t2) / n),
            }
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
        """Stage 1 only: every category ranked by its prototype's cosine similarity."""
        t0 = time.perf_counter()
        queries = self.embed(images)
        index = self.ensure_index()
        t1 = time.perf_counter()
        with self._lock.read():
            scores, lists = index.rank_categories(queries)
            ids = index.category_ids
        t2 = time.perf_counter()
        rankings = [self._ranking(ids, sr, lr, set()) for sr, lr in zip(scores, lists, strict=True)]
        return rankings, {"embed": _ms(t1 - t0), "prototypes": _ms(t2 - t1), "total": _ms(t2 - t0)}

    def _ranking(self, category_ids: list[int], scores: np.ndarray, lists: np.ndarray, searched: set[int]) -> list[CategoryScore]:
        """One query's stage-1 result as named categories, best first; `searched` holds list numbers."""
        return [
            CategoryScore(category_ids[lst], self._name(category_ids[lst]) or "", float(s), int(lst) in searched)
            for s, lst in zip(scores, lists, strict=True)
            if lst >= 0
        ]

    def similar_to(self, image_id: int, limit: int, top_categories: int, use_prototypes: bool) -> SearchResult:
        with session_scope(self.engine) as session:
            catalogue.get_image(session, image_id)
            vector = catalogue.image_vector(session, image_id, self.model)
        if vector is None:
            raise NotFound(f"image {image_id} has no {self.model} embedding (run build-index)")
        return self.search_vectors(vector[None, :], limit, top_categories, use_prototypes, exclude=image_id)[0]

    def _name(self, category_id: int | None) -> str | None:
        if category_id is None or category_id < 0:
            return None
        if category_id not in self._names:
            self._refresh_names()
        return self._names.get(category_id)

    # --- writes: database first (one transaction), then the in-memory index -----------------

    def upload(self, image: DecodedImage, category: str | None, description: str | None = None) -> UploadResult:
        with session_scope(self.engine) as session:
            if catalogue.existing_by_sha(session, [image.sha256]):
                return self._duplicate(session, image.sha256)
            category_id = catalogue.category_by_name(session, category).id if category else None
        vector = self.embed([image.rgb])
        index = self.ensure_index()
        predicted_score = None
        if category_id is None:
            with self._lock.read():
                if not index.prototype_counts.any():
                    raise InvalidInput("no category prototypes yet: give a category with the upload")
                scores, lists = index.rank_categories(vector, top=1)
            category_id = index.category_ids[int(lists[0, 0])]
            predicted_score = float(scores[0, 0])
        if not index.has_categories([category_id]):
            index = self.ensure_index(force_rebuild=True)  # a category created since the index was built
        item = catalogue.NewImage(image, category_id, label_given=predicted_score is None, description=description)
        try:
            image_id = self._write(
                lambda session: catalogue.add_images(session, self.model, [item], vector)[0],
                lambda index, new_id: self._add_to(index, new_id, category_id, vector),
            )
        except IntegrityError:  # the same bytes were stored concurrently
            with session_scope(self.engine) as session:
                return self._duplicate(session, image.sha256)
        return UploadResult(image_id, self._name(category_id), item.label_given, duplicate=False, category_score=predicted_score)

    def _duplicate(self, session: Session, sha256: str) -> UploadResult:
        stored = catalogue.get_image(session, catalogue.existing_by_sha(session, [sha256])[sha256])
        return UploadResult(stored.id, self._name(stored.category_id), stored.label_given, duplicate=True)

    def delete(self, image_id: int) -> Image:
        self.ensure_index()
        return self._write(lambda session: catalogue.delete_image(session, image_id), self._remove_from)

    def rebuild_prototypes(self) -> int:
        return self._write(lambda session: catalogue.rebuild_prototypes(session, self.model), lambda index, count: None)

    @staticmethod
    def _add_to(index: TwoStageIndex, image_id: int, category_id: int, vector: np.ndarray) -> None:
        index.add(np.array([image_id]), np.array([category_id]), vector)
        index.state = catalogue.fingerprint_change(index.state, image_id, category_id, +1)

    @staticmethod
    def _remove_from(index: TwoStageIndex, image: Image) -> None:
        if index.remove(np.array([image.id])):  # an image without a vector of this model leaves it as it was
            index.state = catalogue.fingerprint_change(index.state, image.id, image.category_id, -1)

    def _write(self, change: Callable[[Session], T], update_index: Callable[[TwoStageIndex, T], object]) -> T:
        """One database transaction and the matching in-memory index update, as one step for searches.
        The index state is derived from the change rather than re-read: a full fingerprint scans every
        vector (~0.1 s at 100k) and would block all searches for that long on each upload."""
        with self._lock.write():
            with session_scope(self.engine) as session:
                result = change(session)
                prototypes = catalogue.load_prototypes(session, self.model)
            index = self._index
            if index is not None:
                update_index(index, result)
                index.set_prototypes(prototypes)
        return result

    # --- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with session_scope(self.engine) as session:
            counts = catalogue.category_counts(session)
            fingerprint = catalogue.state_fingerprint(session, self.model)
            models = catalogue.model_ids(session)
        index = self._index
        with self._lock.read():
            index_info = {
                "type": self.settings.faiss_index_type,
                "loaded": index is not None,
                "origin": self.index_origin,
                "vectors": index.ntotal if index else 0,
                "categories": len(index.category_ids) if index else 0,
                "current": index is not None and index.state == fingerprint,
            }
        return {
            "model": {
                "id": self.model,
                "name": self.embedder.name,
                "dim": self.embedder.dim,
                "device": str(self.embedder.device),
                "loaded": self.embedder.loaded,
            },
            "database": {
                "images": sum(c[2] for c in counts),
                "vectors_for_model": fingerprint["vectors"],
                "vectors_by_model": dict(models),
                "categories": [{"id": cid, "name": name, "images": n, "labelled": given} for cid, name, n, given in counts],
            },
            "index": index_info,
            "settings": {
                "use_prototype_filtering": self.settings.use_prototype_filtering,
                "default_top_categories": self.settings.default_top_categories,
                "default_search_limit": self.settings.default_search_limit,
            },
        }
