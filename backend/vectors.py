"""Vector helpers shared by the embedders, the catalogue and the evaluation."""

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as contiguous float32.
    Normalises in the input's precision first, so float64 prototype sums lose nothing before the cast."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)
