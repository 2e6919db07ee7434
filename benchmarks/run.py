"""Speed benchmarks: `python -m backend.cli benchmark [--quick] [--json]` or `python benchmarks/run.py`.

Sections: embed (model throughput), search (exact vs two-stage latency at 10k/100k/1M vectors), build
(index from the database), http (POST /search under concurrency), ingest (end to end vs embedding alone).
Every database it needs is a throwaway embedded PostgreSQL in a temporary folder.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.utils.server import running_server
from backend.core.config import Settings, get_settings
from backend.datasets import Dataset, balanced, find_cifar10, load_cifar10
from backend.vectors import l2_normalise

if TYPE_CHECKING:
    from backend.index import TwoStageIndex

SECTIONS = ("embed", "search", "build", "http", "ingest")
DIM = 1280
N_CATEGORIES = 10


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {f"p{p}": float(np.percentile(ms, p)) for p in (50, 95, 99)}


def throughput(run: Callable[[], object], items: int, min_seconds: float = 1.0) -> float:
    """Best items/s over repeated runs lasting at least `min_seconds` together (at least two runs)."""
    rates: list[float] = []
    spent = 0.0
    while spent < min_seconds or len(rates) < 2:
        t = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t
        rates.append(items / elapsed)
        spent += elapsed
    return max(rates)


def hardware() -> dict:
    import faiss
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "cuda": torch.cuda.is_available(),
    }


def cifar_samples(settings: Settings, n: int, split: str = "train") -> Dataset:
    return Dataset("cifar10", balanced(load_cifar10(find_cifar10(None, settings, download=False), split), n))


# --- embedding ------------------------------------------------------------------------------------


def bench_embed(settings: Settings, quick: bool) -> list[dict]:
    from backend.embedding.base import Embedder, onnxruntime_available
    from backend.embedding.efficientnet import EfficientNetLiteEmbedder
    from backend.embedding.torchvision_models import ResNetEmbedder
    from backend.imaging import decode_image

    onnx_dir = settings.cache_dir / "onnx"

    def make(name: str, size: int | None, batch: int, runtime: str) -> Embedder:
        if name.startswith("efficientnet"):
            return EfficientNetLiteEmbedder(name, size, "auto", batch, runtime=runtime, onnx_dir=onnx_dir)
        # Pretrained ResNet weights cannot be fetched offline; random weights cost the same compute.
        return ResNetEmbedder(name, "random", size, "auto", batch, runtime=runtime, onnx_dir=onnx_dir)

    runtime = "onnx" if onnxruntime_available() else "torch"
    if quick:
        plan = [("efficientnet_lite0", 224, 8, "torch"), ("efficientnet_lite0", 224, 8, runtime)]
    else:
        models = ("efficientnet_lite0", "efficientnet_lite2", "resnet18", "resnet50")
        plan = [(m, None, b, "torch") for m in models for b in (1, 8, 32)]
        plan += [(m, None, b, runtime) for m in models for b in (1, 8, 32)]
        plan += [("efficientnet_lite0", s, 32, runtime) for s in (128, 160)]
    samples = cifar_samples(settings, 64 if quick else 96).samples
    raw = [s.load() for s in samples]
    rows = []
    cache: dict[tuple, Embedder] = {}
    for name, size, batch, rt in plan:
        model = cache.get((name, size, rt)) or make(name, size, batch, rt)
        cache[(name, size, rt)] = model
        model.batch_size = batch
        model.load()
        n = min(len(raw), max(2 * batch, 24 if "lite2" in name or "50" in name else 48))
        pixels = np.stack([model.preprocess(decode_image(b, 10**7).rgb) for b in raw[:n]])
        model.embed_pixels(pixels)  # warm-up: first runs allocate and tune
        model_only = throughput(lambda m=model, p=pixels: m.embed_pixels(p), n)
        with_decode = throughput(lambda m=model, k=n: m.embed([decode_image(b, 10**7).rgb for b in raw[:k]]), n)
        rows.append(
            {
                "model": model.model_id,
                "runtime": model.runtime,
                "batch": batch,
                "input_px": model.image_size,
                "images_per_s": round(model_only, 1),
                "images_per_s_with_decode": round(with_decode, 1),
            }
        )
        print(
            f"  embed {model.model_id:<34} {rt:<5} batch {batch:>3}: {model_only:7.1f} img/s, {with_decode:7.1f} with decode",
            file=sys.stderr,
        )
    return rows


# --- search on synthetic clustered vectors -------------------------------------------------------


def clustered(n: int, seed: int = 0, n_queries: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n unit vectors in N_CATEGORIES clusters (balanced), plus queries drawn from the same clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CATEGORIES, DIM), dtype=np.float32)
    labels = np.arange(n, dtype=np.int64) % N_CATEGORIES
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: 1M x 1280 floats is 5 GB already
        stop = min(n, start + 100_000)
        chunk = centres[labels[start:stop]] + 1.5 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        x[start:stop] = l2_normalise(chunk)
    q = centres[rng.integers(0, N_CATEGORIES, n_queries)] + 1.5 * rng.standard_normal((n_queries, DIM), dtype=np.float32)
    return x, labels, l2_normalise(q)


def synthetic_index(x: np.ndarray, labels: np.ndarray) -> "TwoStageIndex":
    from backend.evaluation import Embedded, build_index

    return build_index(Embedded(x, labels, [str(i) for i in range(N_CATEGORIES)]), "synthetic")


def time_search(index, q: np.ndarray, top: int | None, singles: int) -> dict:
    _, ranked = index.rank_categories(q)
    lists = None if top is None else ranked[:, :top]

    def one(i: int) -> None:
        index.search(q[i : i + 1], 10, None if lists is None else lists[i : i + 1])

    one(0)
    lat = []
    for i in range(singles):
        t = time.perf_counter()
        one(i % len(q))
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    hits = index.search(q, 10, lists)
    qps = len(q) / (time.perf_counter() - t)
    return {**percentiles(lat), "qps": qps, "fraction_scanned": float(np.mean(hits.scanned) / index.ntotal)}


def bench_search(quick: bool, tops: tuple[int, ...] = (1, 2, 3, 5)) -> list[dict]:
    rows = []
    for n in (10_000,) if quick else (10_000, 100_000, 1_000_000):
        before = rss_mb()
        x, labels, q = clustered(n)
        t = time.perf_counter()
        index = synthetic_index(x, labels)
        build_s = time.perf_counter() - t
        del x
        singles = 100 if quick or n >= 1_000_000 else 300
        exact = time_search(index, q, None, singles)
        row = {
            "vectors": n,
            "build_vectors_per_s": round(n / build_s),
            "index_rss_mb": round(rss_mb() - before),
            "exact": exact,
            "two_stage": {},
        }
        for top in tops:
            r = time_search(index, q, top, singles)
            r["speedup_p50"] = exact["p50"] / r["p50"]
            r["speedup_qps"] = r["qps"] / exact["qps"]
            row["two_stage"][top] = r
        rows.append(row)
        print(
            f"  search {n:>9,} vectors: exact p50 {exact['p50']:.2f} ms, "
            + ", ".join(f"C={c} x{r['speedup_p50']:.1f}" for c, r in row["two_stage"].items()),
            file=sys.stderr,
        )
        del index
    return rows


# --- database-backed sections -------------------------------------------------------------------


class TempDatabase:
    """A throwaway embedded PostgreSQL with the schema applied."""

    def __enter__(self) -> "TempDatabase":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        from sqlalchemy.engine import make_url

        from backend.db import migrate
        from backend.db.session import make_engine

        self.tmp = tempfile.TemporaryDirectory(prefix="imsrc-bench-")
        self.server = pgserver.get_server(Path(self.tmp.name) / "pgdata", cleanup_mode="delete")
        self.url = make_url(self.server.get_uri()).set(drivername="postgresql+psycopg2")
        self.engine = make_engine(self.url)
        migrate.upgrade(self.engine)
        self.data_dir = Path(self.tmp.name) / "data"
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.dispose()
        self.server.cleanup()


def bench_build(quick: bool) -> list[dict]:
    from sqlalchemy import insert

    from backend.catalogue import ensure_categories, to_bytes
    from backend.db.models import Embedding, Image, Prototype
    from backend.db.session import session_scope
    from backend.service import SearchService

    rows = []
    for n in (2_000,) if quick else (10_000, 100_000):
        x, labels, _ = clustered(n, n_queries=1)
        with TempDatabase() as db:
            model = "synthetic/none/0px"
            with session_scope(db.engine) as s:
                cats = list(ensure_categories(s, [f"c{i}" for i in range(N_CATEGORIES)]).values())
                for start in range(0, n, 5000):
                    stop = min(n, start + 5000)
                    ids = s.scalars(
                        insert(Image).returning(Image.id),
                        [
                            {
                                "sha256": f"{i:064x}",
                                "data": b"",
                                "size_bytes": 0,
                                "width": 1,
                                "height": 1,
                                "format": "PNG",
                                "category_id": cats[labels[i]],
                                "label_given": True,
                            }
                            for i in range(start, stop)
                        ],
                    ).all()
                    s.execute(
                        insert(Embedding),
                        [
                            {"image_id": i, "model": model, "dim": DIM, "vector": to_bytes(v)}
                            for i, v in zip(ids, x[start:stop], strict=True)
                        ],
                    )
                sums = np.zeros((N_CATEGORIES, DIM))
                np.add.at(sums, labels, x.astype(np.float64))
                s.execute(
                    insert(Prototype),
                    [
                        {
                            "model": model,
                            "category_id": cats[c],
                            "dim": DIM,
                            "vector_sum": sums[c].tobytes(),
                            "count": int((labels == c).sum()),
                        }
                        for c in range(N_CATEGORIES)
                    ],
                )
            del x
            service = SearchService.__new__(SearchService)  # no model needed to rebuild from stored vectors
            service.engine, service.embedder = db.engine, type("E", (), {"model_id": model, "dim": DIM})()
            before = rss_mb()
            t = time.perf_counter()
            index = service._build_from_db()
            seconds = time.perf_counter() - t
            rows.append(
                {
                    "vectors": n,
                    "seconds": round(seconds, 2),
                    "vectors_per_s": round(n / seconds),
                    "rss_mb": round(rss_mb()),
                    "rss_growth_mb": round(rss_mb() - before),
                }
            )
            print(f"  build from database, {n:,} vectors: {n / seconds:,.0f} vectors/s", file=sys.stderr)
            del index
    return rows


def bench_ingest(settings: Settings, quick: bool) -> dict:
    from backend.embedding.registry import create_embedder
    from backend.imaging import decode_image
    from backend.ingest import ingest

    dataset = cifar_samples(settings, 64 if quick else 320)
    embedder = create_embedder(settings, "efficientnet_lite0")
    embedder.load()
    images = [decode_image(s.load(), 10**7).rgb for s in dataset.samples]
    embedder.embed(images[:8])
    t = time.perf_counter()
    embedder.embed(images)
    embed_only = len(images) / (time.perf_counter() - t)
    with TempDatabase() as db:
        report = ingest(dataset, embedder, db.engine, 10**7, progress=False)
    result = {
        "images": report.added,
        "end_to_end_images_per_s": round(report.images_per_second, 1),
        "embedding_only_images_per_s": round(embed_only, 1),
        "overhead_pct": round(100 * (embed_only / report.images_per_second - 1), 1),
    }
    print(f"  ingest: {result['end_to_end_images_per_s']} img/s end to end, {embed_only:.1f} embedding alone", file=sys.stderr)
    return result


def _http_load(base: str, queries: list[bytes], clients: int, per_client: int) -> tuple[list[float], list[float], float]:
    """`clients` threads, each posting `per_client` searches: (latencies, server embed+search times, wall time)."""
    import httpx

    latencies: list[float] = []
    inner: list[float] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(per_client):
                t = time.perf_counter()
                r = http.post("/search?limit=10", files={"file": ("q.png", queries[(offset + i) % len(queries)])})
                elapsed = time.perf_counter() - t
                r.raise_for_status()
                timings = r.json()["timings_ms"]
                with lock:
                    latencies.append(elapsed)
                    inner.append((timings["embed"] + timings["prototypes"] + timings["search"]) / 1000)

    threads = [threading.Thread(target=client, args=(c * 3,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, inner, time.perf_counter() - t


def bench_http(settings: Settings, quick: bool) -> list[dict]:
    import httpx

    from backend.embedding.registry import create_embedder
    from backend.ingest import ingest

    catalogue = cifar_samples(settings, 100 if quick else 1000)
    queries = [s.load() for s in cifar_samples(settings, 20, "test").samples]
    with TempDatabase() as db:
        embedder = create_embedder(settings, "efficientnet_lite0")
        ingest(catalogue, embedder, db.engine, 10**7, progress=False)
        env = {**os.environ, "DATABASE_URL": db.url.render_as_string(hide_password=False), "DATA_DIR": str(db.data_dir)}
        with running_server(env) as base:
            rows = []
            per_client = 8 if quick else 24
            for clients in (1, 2, 8):
                with httpx.Client(base_url=base) as http:  # warm-up
                    http.post("/search", files={"file": ("q.png", queries[0])})
                latencies, inner, wall = _http_load(base, queries, clients, per_client)
                row = {
                    "clients": clients,
                    **percentiles(latencies),
                    "requests_per_s": len(latencies) / wall,
                    "end_to_end_over_embed_plus_search": float(np.mean(latencies) / np.mean(inner)),
                }
                rows.append(row)
                print(f"  http {clients} client(s): p50 {row['p50']:.1f} ms, {row['requests_per_s']:.1f} req/s", file=sys.stderr)
    return rows


# --- report ---------------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    hw = report["hardware"]
    print(
        f"machine: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB; torch {hw['torch']} "
        f"({hw['torch_threads']} threads), faiss {hw['faiss']}; mode: {report['mode']}"
    )
    if "embed" in report:
        print("\nembedding throughput (images/s)")
        print(f"  {'model':<36}{'runtime':>8}{'batch':>6}{'px':>6}{'model only':>12}{'+ decode':>10}")
        for r in report["embed"]:
            print(
                f"  {r['model']:<36}{r['runtime']:>8}{r['batch']:>6}{r['input_px']:>6}{r['images_per_s']:>12.1f}"
                f"{r['images_per_s_with_decode']:>10.1f}"
            )
    if "search" in report:
        print(f"\nsearch latency (ms, one query, k=10) and throughput ({N_CATEGORIES} clustered categories, d={DIM})")
        print(f"  {'vectors':>9} {'search':<12}{'p50':>8}{'p95':>8}{'p99':>8}{'q/s':>9}{'scanned':>9}{'x p50':>7}{'x q/s':>7}")
        for r in report["search"]:
            ex = r["exact"]
            print(
                f"  {r['vectors']:>9,} {'exact':<12}{ex['p50']:>8.2f}{ex['p95']:>8.2f}{ex['p99']:>8.2f}"
                f"{ex['qps']:>9.0f}{ex['fraction_scanned']:>9.2f}{1:>7.1f}{1:>7.1f}"
            )
            for c, t in r["two_stage"].items():
                print(
                    f"  {'':>9} {'C=' + str(c):<12}{t['p50']:>8.2f}{t['p95']:>8.2f}{t['p99']:>8.2f}{t['qps']:>9.0f}"
                    f"{t['fraction_scanned']:>9.2f}{t['speedup_p50']:>7.1f}{t['speedup_qps']:>7.1f}"
                )
            print(f"  {'':>9} index memory {r['index_rss_mb']} MB, in-memory build {r['build_vectors_per_s']:,} vectors/s")
    if "build" in report:
        print("\nindex build from the database")
        for r in report["build"]:
            print(
                f"  {r['vectors']:>9,} vectors: {r['seconds']:.2f} s, {r['vectors_per_s']:,} vectors/s, "
                f"process RSS {r['rss_mb']} MB (+{r['rss_growth_mb']} MB)"
            )
    if "http" in report:
        print("\nHTTP POST /search end to end (Lite0, limit 10, two-stage C=3)")
        for r in report["http"]:
            print(
                f"  {r['clients']} client(s): p50 {r['p50']:.1f} ms, p95 {r['p95']:.1f} ms, p99 {r['p99']:.1f} ms, "
                f"{r['requests_per_s']:.1f} req/s; end-to-end / (embed + search) = "
                f"{r['end_to_end_over_embed_plus_search']:.2f}"
            )
    if "ingest" in report:
        r = report["ingest"]
        print(
            f"\ningestion: {r['end_to_end_images_per_s']} images/s end to end (decode + embed + store) vs "
            f"{r['embedding_only_images_per_s']} embedding alone ({r['images']} CIFAR-10 images)"
        )


def run_benchmarks(args: argparse.Namespace, settings: Settings) -> dict:
    wanted = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
    report: dict = {"mode": "quick" if args.quick else "full", "hardware": hardware()}
    steps: dict[str, Callable[[], object]] = {
        "embed": lambda: bench_embed(settings, args.quick),
        "search": lambda: bench_search(args.quick),
        "build": lambda: bench_build(args.quick),
        "http": lambda: bench_http(settings, args.quick),
        "ingest": lambda: bench_ingest(settings, args.quick),
    }
    for name in SECTIONS:
        if name in wanted:
            report[name] = steps[name]()
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sections")
    run_benchmarks(parser.parse_args(), get_settings())
