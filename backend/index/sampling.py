"""Which stored vectors train an index: a fixed pseudo-random subset decided by the id alone, the same
whether the vectors are in memory (`train_sample`) or asked of the database (`catalogue.load_vectors`
with the rule (SAMPLE_MULTIPLIER, `sample_cut`)); stage 1 samples its labels by the same rule."""

import numpy as np

SAMPLE_MULTIPLIER, SAMPLE_MODULUS = 2654435761, 10_000


def sample_cut(fraction: float) -> int:
    """The cut of the rule `(id * SAMPLE_MULTIPLIER) % SAMPLE_MODULUS < cut` that keeps about `fraction`."""
    return min(SAMPLE_MODULUS, max(1, round(fraction * SAMPLE_MODULUS))) if fraction > 0 else 0


def train_sample(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Which of `ids` train the index, so that a streamed rebuild and an in-memory build train on the same vectors."""
    return (np.asarray(ids, dtype=np.int64) * SAMPLE_MULTIPLIER) % SAMPLE_MODULUS < sample_cut(fraction)
