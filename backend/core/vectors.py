"""Vector data shared by the catalogue, the index, the evaluation and the benchmarks; no database, no FAISS.

Prototypes are computed here and nowhere else: a category's prototype is the L2-normalised mean of its
given-label vectors, kept as a float64 sum and a count so that adding or removing one vector is exact.
"""

from dataclasses import dataclass

import numpy as np

VECTOR_DTYPE = np.dtype("<f4")  # stored embeddings: float32, little endian
SUM_DTYPE = np.dtype("<f8")  # prototype sums: float64, exact over many updates


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as contiguous float32.
    Normalises in the input's precision first, so float64 prototype sums lose nothing before the cast."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass(frozen=True)
class StoredVectors:
    ids: np.ndarray  # int64 image ids
    category_ids: np.ndarray  # int64, -1 where the image has no category
    vectors: np.ndarray  # (n, dim) float32, L2-normalised

    @classmethod
    def empty(cls, dim: int = 0) -> "StoredVectors":
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, dim), np.float32))

    @classmethod
    def concat(cls, parts: list["StoredVectors"]) -> "StoredVectors":
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "category_ids", "vectors")))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PrototypeMatrix:
    category_ids: np.ndarray  # int64
    vectors: np.ndarray  # (n, dim) float32, L2-normalised means
    counts: np.ndarray  # int64 given-label images behind each

    @classmethod
    def from_sums(cls, category_ids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> "PrototypeMatrix":
        keep = np.asarray(counts) > 0
        if not keep.any():
            return cls(np.empty(0, np.int64), np.empty((0, 0), np.float32), np.empty(0, np.int64))
        return cls(
            np.asarray(category_ids, dtype=np.int64)[keep],
            l2_normalise(np.asarray(sums, dtype=SUM_DTYPE)[keep]),
            np.asarray(counts, dtype=np.int64)[keep],
        )

    @classmethod
    def of(cls, category_ids: np.ndarray, vectors: np.ndarray) -> "PrototypeMatrix":
        """Prototypes of labelled vectors in memory (evaluation, benchmarks)."""
        return cls.from_sums(*category_sums(category_ids, vectors))


SUM_CHUNK = 8192  # rows (84 MB of float64 at 1,280-d); stage 1 sums 90,000 labels: 920 MB at once before


def category_sums(category_ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(categories, float64 sums, counts) of `vectors` grouped by category, categories ascending."""
    cats, inverse, counts = np.unique(np.asarray(category_ids, dtype=np.int64), return_inverse=True, return_counts=True)
    sums = np.zeros((len(cats), vectors.shape[1] if vectors.ndim == 2 else 0), dtype=SUM_DTYPE)
    for start in range(0, len(inverse), SUM_CHUNK):  # a float64 copy a chunk at a time, not of every row at once
        part = slice(start, start + SUM_CHUNK)
        np.add.at(sums, inverse[part], np.asarray(vectors[part], dtype=SUM_DTYPE))
    return cats, sums, counts.astype(np.int64)
