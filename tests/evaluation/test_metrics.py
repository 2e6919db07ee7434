"""Metric functions against small cases computed by hand."""

import numpy as np
import pytest

from backend.evaluation import metrics
from backend.index.stage1_models import top_n_accuracy

# Two queries, five results each. Query 0: relevant at ranks 1, 3. Query 1: relevant at rank 2 only.
REL = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=bool)
N_RELEVANT = np.array([4, 1])


def test_precision() -> None:
    assert metrics.precision_at_k(REL, 1) == pytest.approx((1 + 0) / 2)
    assert metrics.precision_at_k(REL, 5) == pytest.approx((2 / 5 + 1 / 5) / 2)


def test_recall() -> None:
    assert metrics.recall_at_k(REL, 5, N_RELEVANT) == pytest.approx((2 / 4 + 1 / 1) / 2)
    assert metrics.recall_at_k(REL, 1, N_RELEVANT) == pytest.approx((1 / 4 + 0) / 2)


def test_f1() -> None:
    p0, r0 = 2 / 5, 2 / 4
    p1, r1 = 1 / 5, 1 / 1
    want = (2 * p0 * r0 / (p0 + r0) + 2 * p1 * r1 / (p1 + r1)) / 2
    assert metrics.f1_at_k(REL, 5, N_RELEVANT) == pytest.approx(want)


def test_average_precision() -> None:
    ap0 = (1 / 1 + 2 / 3) / min(5, 4)  # precision at the relevant ranks 1 and 3, over min(k, relevant)
    ap1 = (1 / 2) / 1
    assert metrics.average_precision_at_k(REL, 5, N_RELEVANT) == pytest.approx((ap0 + ap1) / 2)


def test_mrr_counts_missing_as_zero() -> None:
    rel = np.vstack([REL, np.zeros(5, dtype=bool)])
    assert metrics.mean_reciprocal_rank(rel) == pytest.approx((1 + 1 / 2 + 0) / 3)


def test_ndcg() -> None:
    dcg0 = 1 / np.log2(2) + 1 / np.log2(4)
    idcg0 = 1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4) + 1 / np.log2(5)
    dcg1 = 1 / np.log2(3)
    idcg1 = 1.0
    assert metrics.ndcg_at_k(REL, 5, N_RELEVANT) == pytest.approx((dcg0 / idcg0 + dcg1 / idcg1) / 2)
    perfect = np.array([[1, 1, 0]], dtype=bool)
    assert metrics.ndcg_at_k(perfect, 3, np.array([2])) == pytest.approx(1.0)


def test_overlap_recall_and_top_n() -> None:
    found = np.array([[1, 2, 3], [7, 8, -1]])
    exact = np.array([[3, 2, 9], [7, 9, 10]])
    assert metrics.overlap_recall(found, exact, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    ranked = np.array([[2, 0, 1], [1, 2, 0]])
    assert top_n_accuracy(ranked, np.array([0, 0]), 1) == 0.0
    assert top_n_accuracy(ranked, np.array([0, 0]), 2) == 0.5
