"""Retrieval metrics over binary relevance (relevant = same category as the query).

`rel` is an (n_queries, K) boolean array: rel[q, i] says whether the i-th result of query q is relevant.
`n_relevant` is (n_queries,): how many relevant items the catalogue holds for each query.
Every function returns the mean over queries.
"""

import numpy as np


def precision_at_k(rel: np.ndarray, k: int) -> float:
    return float(rel[:, :k].sum(axis=1).mean() / k)


def recall_at_k(rel: np.ndarray, k: int, n_relevant: np.ndarray) -> float:
    return float(np.mean(rel[:, :k].sum(axis=1) / np.maximum(n_relevant, 1)))


def f1_at_k(rel: np.ndarray, k: int, n_relevant: np.ndarray) -> float:
    """Per-query F1 of precision@k and recall@k, averaged."""
    p = rel[:, :k].sum(axis=1) / k
    r = rel[:, :k].sum(axis=1) / np.maximum(n_relevant, 1)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p, dtype=float), where=(p + r) > 0)
    return float(f1.mean())


def average_precision_at_k(rel: np.ndarray, k: int, n_relevant: np.ndarray) -> float:
    """mAP@k: sum of precision@i at each relevant rank i <= k, over min(k, n_relevant)."""
    r = rel[:, :k].astype(float)
    precision_at_i = np.cumsum(r, axis=1) / np.arange(1, r.shape[1] + 1)
    ap = (precision_at_i * r).sum(axis=1) / np.maximum(np.minimum(k, n_relevant), 1)
    return float(ap.mean())


def mean_reciprocal_rank(rel: np.ndarray) -> float:
    """1/rank of the first relevant result (0 when none is retrieved)."""
    hit = rel.any(axis=1)
    first = rel.argmax(axis=1)
    return float(np.where(hit, 1.0 / (first + 1), 0.0).mean())


def ndcg_at_k(rel: np.ndarray, k: int, n_relevant: np.ndarray) -> float:
    r = rel[:, :k].astype(float)
    discounts = 1.0 / np.log2(np.arange(2, r.shape[1] + 2))
    dcg = (r * discounts).sum(axis=1)
    ideal_hits = np.minimum(k, n_relevant)
    idcg = np.array([discounts[: int(n)].sum() for n in ideal_hits])
    return float(np.mean(np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)))


def overlap_recall(found: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Recall@k of one result list against another (e.g. two-stage against exact), ids -1 ignored."""
    scores = []
    for a, b in zip(found[:, :k], reference[:, :k], strict=True):
        ref = {int(i) for i in b if i >= 0}
        scores.append(len(ref & {int(i) for i in a if i >= 0}) / len(ref) if ref else 1.0)
    return float(np.mean(scores))
