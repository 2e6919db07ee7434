"""The index from the database: a full rebuild, against following another process's writes incrementally."""

import sys
import time

from backend.index.layout import IndexLayout
from backend.search.build import build_from_database
from backend.search.live_index import LiveIndex
from benchmarks.harness import DIM, TempDatabase, clustered, rss_mb, seed_vectors
from benchmarks.sections import storage

MODEL = "synthetic/none/0px"


def run(quick: bool) -> list[dict]:
    rows = []
    for n in (2_000,) if quick else (10_000, 100_000):
        added = 100 if quick else 1_000
        x, labels, _ = clustered(n + added, n_queries=1)
        with TempDatabase() as db:
            seed_vectors(db.engine, MODEL, x[:n], labels[:n])
            before = rss_mb()
            t = time.perf_counter()
            built = build_from_database(db.engine, MODEL, DIM)
            seconds = time.perf_counter() - t
            growth = rss_mb() - before
            del built
            # The streamed path a large catalogue takes: a training sample, then chunks (ivf sq8).
            t = time.perf_counter()
            streamed = build_from_database(db.engine, MODEL, DIM, IndexLayout("ivf", "sq8"), in_memory_bytes=0)
            streamed_s = time.perf_counter() - t
            del streamed
            # A server holding the index; another process adds `added` images; the server follows.
            server = LiveIndex(db.engine, MODEL, DIM, db.data_dir / "index")
            server.get()
            seed_vectors(db.engine, MODEL, x[n:], labels[n:], first=n)
            t = time.perf_counter()
            report = server.refresh()
            follow_s = time.perf_counter() - t
            assert (report.kind, report.added, server.get().ntotal) == ("incremental", added, n + added)
            t = time.perf_counter()
            server.rebuild("benchmark")
            rebuild_s = time.perf_counter() - t
            layout = storage.compare(db.engine, MODEL)
        del x
        rows.append(
            {
                "vectors": n,
                "seconds": round(seconds, 2),
                "vectors_per_s": round(n / seconds),
                "streamed_ivf_sq8_vectors_per_s": round(n / streamed_s),
                "rss_mb": round(rss_mb()),
                "rss_growth_mb": round(growth),
                "follow": {"added": added, "incremental_s": round(follow_s, 4), "full_rebuild_s": round(rebuild_s, 3)},
                "storage": layout,
            }
        )
        print(
            f"  build from database, {n:,} vectors: {n / seconds:,.0f} vectors/s (streamed {n / streamed_s:,.0f}); "
            f"follow {added:,} added: "
            f"{follow_s * 1000:.1f} ms incremental vs {rebuild_s * 1000:.0f} ms full rebuild; reading all vectors: "
            f"{layout['inline_read_vectors_per_s']:,}/s inline vs {layout['toast_read_vectors_per_s']:,}/s in TOAST",
            file=sys.stderr,
        )
    return rows
