"""`evaluate` and `benchmark --quick` as a user runs them, on the real CIFAR-10 subset."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.utils.cli import run_cli
from tests.utils.settings import CIFAR_SUBSET

pytestmark = [pytest.mark.db, pytest.mark.model]  # CLI processes that embed and start databases


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli({"DATA_DIR": str(tmp_path), "CIFAR10_DIR": str(CIFAR_SUBSET)}, *args, timeout=600)


def test_evaluate_reports_every_metric_and_caches_embeddings(tmp_path: Path) -> None:
    r = cli(tmp_path, "evaluate", "--catalogue-size", "200", "--queries", "40", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["catalogue_size"], report["queries"], report["categories"]) == (200, 40, 10)
    assert 0.5 <= report["prototype_top1_accuracy"] <= report["prototype_top3_accuracy"] <= 1
    rows = {row["search"]: row for row in report["rows"]}
    assert set(rows) == {"exact", "two-stage C=1", "two-stage C=2", "two-stage C=3", "two-stage C=5", "two-stage C=10 (all)"}
    exact = rows["exact"]
    assert exact["precision@10"] > 0.3 and exact["recall@10_vs_exact"] == 1 and exact["fraction_scanned"] == 1
    for key in ("recall@10", "mAP@10", "precision@100", "recall@100", "mAP@100", "MRR", "NDCG@10", "F1@10", "latency_ms_p50"):
        assert key in exact
    assert rows["two-stage C=1"]["fraction_scanned"] == 0.1
    assert rows["two-stage C=10 (all)"]["recall@10_vs_exact"] == 1
    assert rows["two-stage C=1"]["recall@10_vs_exact"] <= rows["two-stage C=5"]["recall@10_vs_exact"]
    stage1 = {row["stage1"]: row for row in report["stage1"]["rows"]}
    assert set(stage1) == set(report["stage1"]["synthetic_latency_ms"]) == {"prototype", "centroids", "classifier"}
    assert report["stage1"]["auto"] in stage1
    # The prototype ranker is the one the table above measured; every ranker is far above chance (0.1).
    assert stage1["prototype"]["top1"] == report["prototype_top1_accuracy"]
    assert stage1["prototype"]["P@10 C=1"] == rows["two-stage C=1"]["precision@10"]
    for row in stage1.values():
        assert 0.5 <= row["top1"] <= row["top3"] <= 1 and row["latency_ms"] > 0 and row["train_s"] >= 0
        assert 0 < row["R@10/exact C=1"] <= row["R@10/exact C=3"] <= 1

    cached = list((tmp_path / "cache" / "embeddings").rglob("*.npz"))
    assert len(cached) == 2
    again = cli(tmp_path, "evaluate", "--catalogue-size", "200", "--queries", "40")
    assert again.returncode == 0 and "embed cifar10" not in again.stderr  # nothing re-embedded
    assert "nearest-prototype category accuracy" in again.stdout
    assert "stage 1 (exact search P@10" in again.stdout and "1000 synthetic categories" in again.stdout


def test_benchmark_quick_prints_every_section(tmp_path: Path) -> None:
    r = cli(tmp_path, "benchmark", "--quick", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report) >= {"hardware", "embed", "search", "build", "http", "ingest"}
    assert report["embed"][0]["images_per_s"] > 0
    search = report["search"][0]
    assert search["vectors"] == 10_000 and set(search["two_stage"]) == {"1", "2", "3", "5"}
    # Scanning a tenth of the vectors must be faster than scanning all of them.
    assert search["two_stage"]["1"]["fraction_scanned"] < 0.2 and search["two_stage"]["1"]["qps"] > search["exact"]["qps"]
    assert [row["clients"] for row in report["http"]] == [1, 2, 8]
    assert report["ingest"]["images"] == 64
