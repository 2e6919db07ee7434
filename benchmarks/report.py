"""The human-readable report of a benchmark run."""

from benchmarks.harness import DIM, N_CATEGORIES


def print_report(report: dict) -> None:
    hw = report["hardware"]
    print(
        f"machine: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB; torch {hw['torch']} "
        f"({hw['torch_threads']} threads), faiss {hw['faiss']}; mode: {report['mode']}"
    )
    if "embed" in report:
        print("\nembedding throughput (images/s)")
        print(f"  {'model':<52}{'runtime':>8}{'batch':>6}{'px':>6}{'model only':>12}{'+ decode':>10}")
        for r in report["embed"]:
            print(
                f"  {r['model']:<52}{r['runtime']:>8}{r['batch']:>6}{r['input_px']:>6}{r['images_per_s']:>12.1f}"
                f"{r['images_per_s_with_decode']:>10.1f}"
            )
    if "precision" in report:
        print_precision(report["precision"])
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
    if "indexes" in report:
        print_indexes(report["indexes"])
    if "jobs" in report:
        r = report["jobs"]
        per = ", ".join(f"{w} worker(s) {v['images_per_s']} images/s" for w, v in r["workers"].items())
        seen = r["server_sees_worker_s"]
        print(
            f"\ncatalogue jobs ({r['images']} CIFAR-10 images): {per}; embedding alone in one process "
            f"{r['embedding_alone_images_per_s']} images/s"
            + (f"; a server finds a separate worker's image {seen} s after its job ends" if seen is not None else "")
        )
    if "build" in report:
        print("\nindex build from the database")
        for r in report["build"]:
            print(
                f"  {r['vectors']:>9,} vectors: {r['seconds']:.2f} s, {r['vectors_per_s']:,} vectors/s "
                f"(streamed in chunks, ivf sq8: {r['streamed_ivf_sq8_vectors_per_s']:,} vectors/s), "
                f"process RSS {r['rss_mb']} MB (+{r['rss_growth_mb']} MB)"
            )
            f = r["follow"]
            print(
                f"  {'':>9} a server picks up {f['added']:,} images added by another process: "
                f"{f['incremental_s'] * 1000:.1f} ms incremental vs {f['full_rebuild_s'] * 1000:.0f} ms full rebuild "
                f"(x{f['full_rebuild_s'] / f['incremental_s']:.0f})"
            )
            if "storage" in r:
                s = r["storage"]
                print(
                    f"  {'':>9} reading every vector (binary COPY): {s['inline_read_vectors_per_s']:,}/s stored inline "
                    f"(0005, table+TOAST {s['inline_table_mb']} MB) vs {s['toast_read_vectors_per_s']:,}/s in TOAST "
                    f"(0004, {s['toast_table_mb']} MB); migration 0005 took {s['migration_0005_s']} s"
                )
    if "http" in report:
        print_http(report["http"])
    if "ingest" in report:
        print_ingest(report["ingest"])


def print_http(rows: list[dict]) -> None:
    print("\nHTTP POST /search end to end (Lite0, a 768x576 JPEG photo, limit 10, two-stage C=3)")
    for r in rows:
        print(
            f"  {r['clients']} client(s): p50 {r['p50']:.1f} ms, p95 {r['p95']:.1f} ms, p99 {r['p99']:.1f} ms, "
            f"{r['requests_per_s']:.1f} req/s; p50 / server's embed + stage 1 + stage 2 = {r['p50_over_server_compute']:.2f}"
            + (f" (goal <= 1.3: {'met' if r['p50_over_server_compute'] <= 1.3 else 'MISSED'})" if r["clients"] == 1 else "")
        )


def print_ingest(r: dict) -> None:
    print(f"\ningestion ({r['images']} CIFAR-10 images; decode + embed + store, batches of 128), images/s")
    for row in r["rows"]:
        sequential = row.get("sequential_images_per_s")
        print(
            f"  {row['precision']}: pipelined {row['pipelined_images_per_s']}"
            + (f", sequential {sequential}" if sequential else "")
            + f", embedding alone {row['embedding_alone_images_per_s']} (pipelined / alone "
            f"{row['pipelined_over_embedding_alone']:.2f}, goal >= {r['goal_ratio']}: "
            f"{'met' if row['pipelined_over_embedding_alone'] >= r['goal_ratio'] else 'MISSED'})"
        )
        if row["precision"] == "int8":
            met = row["pipelined_images_per_s"] >= r["goal_int8_images_per_s"]
            print(f"  int8 pipelined >= {r['goal_int8_images_per_s']:.0f} images/s: {'met' if met else 'MISSED'}")


def print_precision(r: dict) -> None:
    if "skipped" in r:
        print(f"\nint8 against fp32: skipped ({r['skipped']})")
        return
    print(f"\nint8 ({r['int8_model']}) against fp32, images/s, measured in alternation")
    for row in r["rows"]:
        fp32, int8 = row["fp32_images_per_s"], row["int8_images_per_s"]
        print(f"  batch {row['batch']:>3}: fp32 {fp32:>7.1f}, int8 {int8:>7.1f}  x{row['ratio']:.2f}")
    goal = "measured at batch 32 by the full run" if r["met"] is None else ("met" if r["met"] else "MISSED")
    print(f"  goal int8 >= {r['goal']}x fp32 at batch 32: {goal}" + (f"; {r['warning']}" if r["warning"] else ""))


def print_indexes(sections: list[dict]) -> None:
    print("\nindex types side by side (k=10, one query at a time; recall@10 against exact search over all vectors)")
    for s in sections:
        print(f"\n  {s['name']}: {s['vectors']:,} vectors, {s['queries']:,} queries")
        print(f"  {'method':<44}{'setting':<15}{'R@10':>7}{'P@10':>7}{'p50 ms':>8}{'p95 ms':>8}{'mem MB':>9}{'build s':>9}")
        for r in s["rows"]:
            p10 = f"{r['P@10']:.3f}" if r.get("P@10") is not None else "-"
            print(
                f"  {r['method']:<44}{r['knob']:<15}{r['recall@10']:>7.3f}{p10:>7}{r['p50']:>8.3f}{r['p95']:>8.3f}"
                f"{r['memory_mb']:>9.0f}{r['build_s']:>9.1f}"
                + (f"  + re-rank file {r['rerank_file_mb']:.0f} MB" if "rerank_file_mb" in r else "")
            )
        print_fastscan_goal(s.get("fastscan_goal"))
        g = s["goal"]
        if "index_memory_gb" in s:
            o = g.get("ours")
            print(
                f"  goal (recall >= 0.95, p50 <= 20 ms, memory <= 16 GB): {'met' if g['met'] else 'MISSED'}; index "
                f"{s['index_memory_gb']:.1f} GB (process grew {s['process_rss_growth_gb']:.1f} GB)"
                + (f"; {o['knob']}: R@10 {o['recall@10']:.3f}, p50 {o['p50']:.2f} ms" if o else "")
                + f"; exact streamed scan {s['exact_scan_s_per_query'] * 1000:.0f} ms/query"
            )
        elif "hnsw" in g:
            print(
                f"  goal (two-stage C=3 at R@10 >= 0.97 as fast as HNSW at that recall): {'met' if g['met'] else 'MISSED'}: "
                f"{g['ours']['method']} {g['ours']['knob']} {g['ours']['p50']:.3f} ms vs HNSW {g['hnsw']['knob']} "
                f"{g['hnsw']['p50']:.3f} ms (x{g['ratio']:.2f})"
            )
        else:
            print(f"  goal: {'met' if g['met'] else 'MISSED'}: {g.get('why', '')}")


def print_fastscan_goal(g: dict | None) -> None:
    if g is None:
        return
    if "hnsw" not in g:
        print(f"  fastscan goal: {'met' if g['met'] else 'MISSED'}: {g.get('why', '')}")
        return
    print(
        f"  fastscan goal (C=3 at R@10 >= 0.97, p50 <= 0.8x HNSW at that recall): {'met' if g['met'] else 'MISSED'}: "
        f"{g['ours']['method']} {g['ours']['knob']} R@10 {g['ours']['recall@10']:.3f} {g['ours']['p50']:.3f} ms vs HNSW "
        f"{g['hnsw']['knob']} R@10 {g['hnsw']['recall@10']:.3f} {g['hnsw']['p50']:.3f} ms (x{g['ratio']:.2f})"
    )


def markdown_indexes(sections: list[dict]) -> str:
    """The `indexes` section as Markdown tables (for the README)."""
    out = []
    for s in sections:
        out.append(f"**{s['name']}** — {s['vectors']:,} vectors, {s['queries']:,} queries\n")
        out.append("| method | setting | recall@10 | P@10 | p50 ms | p95 ms | memory MB | build s |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in s["rows"]:
            p10 = f"{r['P@10']:.3f}" if r.get("P@10") is not None else "–"
            out.append(
                f"| {r['method']} | {r['knob']} | {r['recall@10']:.3f} | {p10} | {r['p50']:.3f} | {r['p95']:.3f} "
                f"| {r['memory_mb']:,.0f} | {r['build_s']:.1f} |"
            )
        out.append("")
    return "\n".join(out)
