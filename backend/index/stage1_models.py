"""Stage-1 category rankers learned from labelled embeddings, in NumPy: no database, no FAISS index.

- `Centroids`: each category's spherical k-means sub-centroids; a category scores its best sub-centroid.
- `LinearSoftmax`: a linear softmax classifier, trained with Adam on mini-batches, classes balanced.
Every ranker gives logits; `fit_temperature` turns them into calibrated probabilities (softmax(logits / T))
by the temperature that minimises the negative log-likelihood on held-out labels.
"""

import time
from dataclasses import dataclass, field

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from backend.core.vectors import PrototypeMatrix, l2_normalise

SEED = 1234


def one_blas_thread() -> None:
    """Rank with one BLAS thread in this process from now on. Request threads rank at the same time, and a
    pool of BLAS threads per product only makes them wait on each other: a 1,000-category classifier took
    0.19 ms a query with one thread and 12 ms with two on a busy 2-core machine (measured)."""
    threadpool_limits(1, user_api="blas")


HELDOUT_MULTIPLIER, HELDOUT_MODULUS, HELDOUT_CUT = 40503, 10_000, 1_000  # 10 % of ids, decided by the id alone
SUB_CENTROIDS = 16  # per category (fewer for small categories)
POINTS_PER_SUB_CENTROID = 39  # a category of n labels gets at most n // this (what FAISS k-means asks for)
KMEANS_ITERATIONS = 20


def heldout_mask(ids: np.ndarray) -> np.ndarray:
    """Which labelled images are held out of training (to check and calibrate): a fixed tenth, by id."""
    return (np.asarray(ids, dtype=np.int64) * HELDOUT_MULTIPLIER) % HELDOUT_MODULUS < HELDOUT_CUT


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the held-out NLL of softmax(logits / T): a coarse log grid, then golden section."""
    if len(labels) == 0:
        return 1.0
    grid = np.logspace(-4, 3, 36)
    losses = [log_loss(logits, labels, t) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = np.log(grid[max(best - 1, 0)]), np.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(30):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if log_loss(logits, labels, float(np.exp(a))) < log_loss(logits, labels, float(np.exp(b))):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


@dataclass
class Centroids:
    vectors: np.ndarray  # (m, dim) float32 unit sub-centroids; category j owns rows offsets[j]:offsets[j+1]
    offsets: np.ndarray  # (C + 1,) int64; every category has at least one row (a zero row when it had no labels)

    @classmethod
    def fit(cls, vectors: np.ndarray, labels: np.ndarray, n_categories: int, per_category: int = SUB_CENTROIDS) -> "Centroids":
        """Spherical k-means of each category's labelled vectors (`labels` are category numbers 0..C-1)."""
        dim = vectors.shape[1]
        blocks, counts = [], []
        for j in range(n_categories):
            x = np.ascontiguousarray(vectors[labels == j], dtype=np.float32)
            k = max(1, min(per_category, len(x) // POINTS_PER_SUB_CENTROID))
            if len(x) == 0:
                block = np.zeros((1, dim), np.float32)
            elif k == 1:
                block = l2_normalise(x.mean(axis=0, keepdims=True))
            else:
                km = faiss.Kmeans(
                    dim,
                    k,
                    niter=KMEANS_ITERATIONS,
                    seed=SEED,
                    spherical=True,
                    max_points_per_centroid=256,
                    min_points_per_centroid=1,
                )
                km.train(x)
                block = np.asarray(km.centroids, dtype=np.float32)
            blocks.append(block)
            counts.append(len(block))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32), offsets)

    def logits(self, queries: np.ndarray) -> np.ndarray:
        """(n, C): each category's best sub-centroid cosine similarity."""
        sims = np.asarray(queries, dtype=np.float32) @ self.vectors.T
        return np.maximum.reduceat(sims, self.offsets[:-1], axis=1)

    def nearest_categories(self, queries: np.ndarray, top: int) -> np.ndarray:
        """(n, top) category numbers of the `top` globally nearest sub-centroids (a category may repeat)."""
        sims = np.asarray(queries, dtype=np.float32) @ self.vectors.T
        top = min(top, sims.shape[1])
        best = np.argpartition(-sims, top - 1, axis=1)[:, :top]
        return np.searchsorted(self.offsets, best, side="right") - 1


@dataclass
class LinearSoftmax:
    weights: np.ndarray  # (dim, C) float32
    bias: np.ndarray  # (C,) float32

    def logits(self, queries: np.ndarray) -> np.ndarray:
        return np.asarray(queries, dtype=np.float32) @ self.weights + self.bias

    @classmethod
    def train(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        n_categories: int,
        epochs: int = 40,
        batch: int = 512,
        lr: float = 3e-2,
        min_steps: int = 800,
        weight_decay: float = 0.0,
    ) -> "LinearSoftmax":
        """Adam on shuffled mini-batches of the softmax cross-entropy, each class weighted by 1 / its count
        (a rare category counts as much as a common one). No weight decay by default: on Fashion-MNIST 1e-4
        cost 2 points of accuracy."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        y = np.asarray(labels, dtype=np.int64)
        n, dim = x.shape
        counts = np.bincount(y, minlength=n_categories).astype(np.float32)
        class_weight = np.where(counts > 0, n / (np.maximum(counts, 1) * max(1, (counts > 0).sum())), 0).astype(np.float32)
        params = [np.zeros((dim, n_categories), np.float32), np.zeros(n_categories, np.float32)]
        params[1][counts == 0] = -1e4  # a category without labels is never predicted
        moments = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
        rng = np.random.default_rng(SEED)
        step = 0
        steps_per_epoch = -(-n // batch)
        for _ in range(max(epochs, -(-min_steps // max(steps_per_epoch, 1)))):  # small catalogues: enough steps anyway
            order = rng.permutation(n)
            for start in range(0, n, batch):
                rows = order[start : start + batch]
                xb, yb = x[rows], y[rows]
                grad_z = softmax(xb @ params[0] + params[1])
                grad_z[np.arange(len(rows)), yb] -= 1
                grad_z *= (class_weight[yb] / len(rows))[:, None]
                grads = [xb.T @ grad_z + weight_decay * params[0], grad_z.sum(axis=0)]
                step += 1
                for p, g, (m, v) in zip(params, grads, moments, strict=True):
                    _adam_step(p, g, m, v, step, lr)
        params[1][counts == 0] = -1e4
        return cls(params[0], params[1])


def _adam_step(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float) -> None:
    """One Adam update of `p` in place (first and second moments `m`, `v` updated in place too)."""
    beta1, beta2 = 0.9, 0.999
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    p -= lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + 1e-8)


RANKERS = ("prototype", "centroids", "classifier")


@dataclass
class Trained:
    """The learned rankers of one catalogue's given labels, with what the held-out tenth said of each."""

    category_ids: np.ndarray  # int64: the categories, in the order of the classifier's and centroids' columns
    classifier: LinearSoftmax
    centroids: Centroids
    temperatures: dict[str, float]  # per ranker: softmax(logits / T) is its calibrated probability
    heldout: dict[str, dict[str, float]]  # per ranker: top-1 and top-3 accuracy on the held-out labels
    train_seconds: dict[str, float] = field(default_factory=dict)
    labels: int = 0

    def best(self) -> str:
        """The ranker with the best held-out top-1 accuracy (the simpler one on a tie)."""
        return max(RANKERS, key=lambda r: (self.heldout[r]["top1"], -RANKERS.index(r)))


def prototype_logits(prototypes: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.asarray(queries, dtype=np.float32) @ prototypes.T


def _keep_rows(x: np.ndarray, keep: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """x[keep] (increasing row numbers) as a view of x's first rows, moved there in place a chunk at a time:
    row keep[i] >= i, so no chunk overwrites a row a later chunk still reads."""
    for start in range(0, len(keep), chunk):
        rows = keep[start : start + chunk]
        x[start : start + len(rows)] = x[rows]
    return x[: len(keep)]


def train_rankers(ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray, consume: bool = False) -> Trained:
    """Centroids and classifier trained on nine tenths of the given labels (`heldout_mask`); every ranker,
    prototypes included, checked and calibrated on the tenth held out."""
    cats, y = np.unique(np.asarray(category_ids, dtype=np.int64), return_inverse=True)
    x = np.asarray(vectors, dtype=np.float32)
    hold = heldout_mask(ids)
    if hold.all() or not hold.any():
        hold = np.zeros(len(x), bool)
    xc, yc, yt = x[hold], y[hold], y[~hold]
    # `consume`: the caller's vectors are not used again, so the training rows move to their front in place
    # instead of being copied (at MAX_TRAIN_LABELS: 460 MB less at the peak)
    xt = _keep_rows(x, np.flatnonzero(~hold)) if consume and x is vectors and x.flags.writeable else x[~hold]
    n_cat = len(cats)
    seconds = {}
    start = time.perf_counter()
    protos = PrototypeMatrix.of(yt, xt)
    proto_matrix = np.zeros((n_cat, x.shape[1]), np.float32)
    proto_matrix[protos.category_ids] = protos.vectors
    seconds["prototype"] = time.perf_counter() - start
    start = time.perf_counter()
    centroids = Centroids.fit(xt, yt, n_cat)
    seconds["centroids"] = time.perf_counter() - start
    start = time.perf_counter()
    with threadpool_limits(1, user_api="blas"):  # small products: threads only wait on each other (20x slower, measured)
        classifier = LinearSoftmax.train(xt, yt, n_cat)
    seconds["classifier"] = time.perf_counter() - start
    logits = {
        "prototype": prototype_logits(proto_matrix, xc),
        "centroids": centroids.logits(xc),
        "classifier": classifier.logits(xc),
    }
    return Trained(
        cats,
        classifier,
        centroids,
        {r: fit_temperature(z, yc) for r, z in logits.items()},
        {r: _accuracy(z, yc) for r, z in logits.items()},
        seconds,
        len(x),
    )


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if len(labels) == 0:
        return {"top1": 0.0, "top3": 0.0}
    ranked = np.argsort(-logits, axis=1, kind="stable")
    return {f"top{n}": top_n_accuracy(ranked, labels, n) for n in (1, 3)}


def top_n_accuracy(ranked_labels: np.ndarray, labels: np.ndarray, n: int) -> float:
    """Share of queries whose true label is among the first n ranked labels."""
    return float(np.mean([lbl in row[:n] for row, lbl in zip(ranked_labels, labels, strict=True)]))
