"""fastscan beside the other index types in the `indexes` section: an M sweep, an nprobe sweep and
re-rank sizes, with the re-rank file's size, on the same vectors and exact truth as the other rows; and
issue 20's goals: at 60k real and 1M, fastscan C=3 at recall@10 >= 0.97 with a p50 at most 0.8x that of
HNSW tuned to the same recall; at 10M, recall@10 >= 0.95 at p50 <= 10 ms in <= 4 GB of index RAM.

`python -m benchmarks.sections.indexes_fastscan [--queries N]` runs the Fashion-MNIST comparison alone
(ours flat / ivf float16 / fastscan, exact, FAISS HNSW; no pgvector): the figures in the README.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.core.config import get_settings
from backend.core.vectors import PrototypeMatrix, StoredVectors
from backend.index.category_index import CategoryIndex
from backend.index.fastscan import FastScanIndex
from backend.index.layout import IndexLayout
from backend.search.build import index_class
from benchmarks.harness import hardware
from benchmarks.sections import indexes

MS = (160, 320)  # 4-bit sub-quantizers: 8 or 4 dimensions each of Lite0's 1280 (80 or 160 bytes a vector)
SHORTLISTS = (50, 100)  # RERANK_CANDIDATES re-scored from the float16 file
GOAL_RATIO, GOAL_RECALL = 0.8, 0.97
NPROBES_10M = (8, 16, 32, 64, 128, 256)  # lists of 1,024: ~98 a category at 10M


def rows(
    stored: StoredVectors,
    q: np.ndarray,
    truth: np.ndarray,
    q_labels: np.ndarray | None,
    labels: np.ndarray | None,
    list_size: int = 256,
    ms: tuple[int, ...] = MS,
    shortlists: tuple[int, ...] = SHORTLISTS,
) -> list[dict]:
    """fastscan C=3 for each M and re-rank size over an nprobe sweep; the re-rank file on disk (mapped)."""
    out = []
    n_cat = int(stored.category_ids.max()) + 1
    prototypes = PrototypeMatrix.of(stored.category_ids, stored.vectors)
    for m in ms:
        with tempfile.TemporaryDirectory(prefix="imsrc-rerank-") as tmp:
            spec = IndexLayout("fastscan", f"pq{m}", list_size)
            t = time.perf_counter()
            index = FastScanIndex.build("bench", q.shape[1], list(range(n_cat)), stored, prototypes, spec, Path(tmp))
            build_s = time.perf_counter() - t
            assert isinstance(index, FastScanIndex)
            for shortlist in shortlists:
                found = indexes.sweep_ours(index, q, truth, spec, build_s, q_labels, labels, shortlist)
                for r in found:
                    r["rerank_file_mb"] = index.vectors.file_bytes() / 2**20
                out += found
                indexes.log(f"fastscan pq{m}x4 re-rank {shortlist}: best recall {max(r['recall@10'] for r in found):.3f}")
            del index
    return out


def goal(section: dict) -> dict:
    """The fastest fastscan row at recall >= GOAL_RECALL against the fastest HNSW row reaching its recall."""
    fast = [r for r in section["rows"] if r["method"].startswith("ours fastscan") and r["recall@10"] >= GOAL_RECALL]
    if not fast:
        best = max((r["recall@10"] for r in section["rows"] if r["method"].startswith("ours fastscan")), default=0.0)
        return {"met": False, "why": f"no fastscan C=3 setting reaches recall {GOAL_RECALL} (best {best:.3f})"}
    ours = min(fast, key=lambda r: r["p50"])
    tuned = [r for r in section["rows"] if r["method"].startswith("FAISS HNSW") and r["recall@10"] >= ours["recall@10"]]
    if not tuned:
        return {"met": True, "ours": ours, "why": "HNSW did not reach that recall in the sweep"}
    hnsw = min(tuned, key=lambda r: r["p50"])
    ratio = ours["p50"] / hnsw["p50"]
    return {"met": ratio <= GOAL_RATIO, "ours": ours, "hnsw": hnsw, "ratio": ratio}


def with_fastscan(section: dict) -> dict:
    section["fastscan_goal"] = goal(section)
    return section


def ten_million(n: int = 10_000_000, m: int = 640, shortlists: tuple[int, ...] = (400, 1000)) -> dict:
    """n synthetic vectors built in chunks, the re-rank rows spooled to a file under DATA_DIR as they come
    (25 GB at 10M: more than /tmp may hold). pq640 by default: at 1M, pq320's 4-bit codes cap recall@10 at
    0.945 even with 1,000 rows re-ranked; 640 bytes of codes a vector keep 10M within the 4 GB goal."""
    from benchmarks.sections import indexes_10m

    directory = get_settings().data_dir
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imsrc-rerank-", dir=directory) as tmp:
        spec = IndexLayout("fastscan", f"pq{m}", 1024)
        section = indexes_10m.ten_million(n, spec, store_dir=Path(tmp), shortlists=shortlists, nprobes=NPROBES_10M)
    ok = [r for r in section["rows"] if r["recall@10"] >= 0.95 and r["p50"] <= 10]
    section["goal"] = {
        "met": bool(ok) and section["index_memory_gb"] <= 4,
        "ours": min(ok or section["rows"], key=lambda r: r["p50"]),
        "why": "recall@10 >= 0.95, p50 <= 10 ms, index RAM <= 4 GB (the re-rank copy on disk)",
    }
    return section


def fashion(queries: int | None) -> dict:
    """Fashion-MNIST 60k (Lite0, cached embeddings under DATA_DIR/cache) alone: flat, ivf float16, fastscan,
    exact and HNSW in one run."""
    stored, q, q_labels = indexes.real(get_settings(), "fashion-mnist", queries)
    specs = [IndexLayout("flat"), IndexLayout("ivf", "float16", 256)]
    section = indexes.compare("Fashion-MNIST train (Lite0)", stored, q, q_labels, specs, False, True, rows)
    return with_fastscan(section)


def threshold(stored: StoredVectors, q: np.ndarray, sizes: tuple[int, ...]) -> list[dict]:
    """auto's switch: flat against fastscan (pq dim/4, nprobe 32, re-rank 50) on growing prefixes of one
    catalogue; flat is exact inside the top categories, so fastscan must be clearly faster to be chosen."""
    out = []
    for n in sizes:
        part = StoredVectors(stored.ids[:n], stored.category_ids[:n], stored.vectors[:n])
        truth = indexes.exact(part.vectors, q)[0]
        row = {"vectors": n}
        for name, spec, nprobe in (("flat", IndexLayout("flat"), None), ("fastscan", IndexLayout("fastscan", "pq320", 256), 32)):
            t = time.perf_counter()
            index = index_class(spec.kind).build(
                "bench",
                q.shape[1],
                list(range(int(part.category_ids.max()) + 1)),
                part,
                PrototypeMatrix.of(part.category_ids, part.vectors),
                spec,
            )
            build_s = time.perf_counter() - t

            def one(i: int, index: CategoryIndex = index, nprobe: int | None = nprobe) -> None:
                _, cats = index.rank_categories(q[i : i + 1], indexes.TOP_C)
                index.search(q[i : i + 1], indexes.K, cats, nprobe, SHORTLISTS[0])

            _, cats = index.rank_categories(q, indexes.TOP_C)
            found = index.search(q, indexes.K, cats, nprobe, SHORTLISTS[0]).ids
            row[name] = {"recall@10": indexes.recall(found, truth), **indexes.latency(one, len(q)), "build_s": build_s}
        indexes.log(f"auto threshold at {n:,}: {row}")
        out.append(row)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=None, help="test images used as queries (default all 10,000)")
    parser.add_argument("--json", type=Path, help="also write the section as JSON here")
    parser.add_argument("--threshold", action="store_true", help="measure auto's flat/fastscan switch instead")
    args = parser.parse_args()
    from benchmarks.report import print_indexes

    if args.threshold:
        data, queries, _ = indexes.real(get_settings(), "fashion-mnist", args.queries)
        rows_ = threshold(data, queries, (5_000, 10_000, 20_000, 40_000))
        print(json.dumps({"hardware": hardware(), "threshold": rows_}, indent=1))
        raise SystemExit(0)
    report = {"hardware": hardware(), "indexes": [fashion(args.queries)]}
    print(json.dumps(report["hardware"]))
    print_indexes(report["indexes"])
    if args.json:
        args.json.write_text(json.dumps(report, default=float))
