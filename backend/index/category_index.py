"""What every index of the catalogue offers, whatever its lists hold: `CategoryIndex`.

Two implementations, siblings: `TwoStageIndex` (flat, ivf) and `FastScanIndex` (fastscan); the category
bookkeeping they share is `CategoryLists`. The live index, stage 1, the own-image probe and the services
(backend/search, backend/services) know this protocol only, so a shard process can hold either.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from backend.core.vectors import PrototypeMatrix
from backend.index.layout import IndexDescription, IndexLayout


@dataclass(frozen=True)
class SearchHits:
    scores: np.ndarray  # (n, k) float32 cosine similarities, -inf where fewer than k were found
    ids: np.ndarray  # (n, k) int64 image ids, -1 where fewer than k were found
    scanned: np.ndarray  # (n,) vectors each query compared against


class CategoryIndex(Protocol):
    model: str
    dim: int
    layout: IndexLayout
    category_ids: list[int]  # category number j -> category id
    list_of: dict[int, int]  # category id -> category number
    prototype_counts: np.ndarray
    prototypes_set: bool
    ivf: faiss.IndexIVF  # the lists, one block of sub-lists per category

    @property
    def ntotal(self) -> int: ...

    def set_prototypes(self, prototypes: PrototypeMatrix) -> None: ...

    def rank_categories(self, queries: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 by the prototypes: (scores, category numbers), best first."""
        ...

    def search(
        self, queries: np.ndarray, k: int, categories: np.ndarray | None = None, nprobe: int | None = None, shortlist: int = 0
    ) -> SearchHits:
        """Stage 2 over the given (n, C) category numbers; None: every list."""
        ...

    def add(self, ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def has_categories(self, category_ids: list[int]) -> bool: ...

    def with_categories(self, category_ids: list[int]) -> "CategoryIndex": ...

    def category_sizes(self) -> np.ndarray: ...

    def needs_retraining(self) -> list[str]: ...

    def memory_bytes(self) -> int: ...

    def describe(self) -> IndexDescription: ...

    def write(self, sink: Callable[[bytes], object]) -> None: ...
