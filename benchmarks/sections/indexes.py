"""Index types and codecs side by side, on the same vectors in one run: our two-stage index (flat and ivf,
float32 / float16 / sq8), an exact flat scan, FAISS HNSW over everything (tuned to our recall), and up to
100k vectors PostgreSQL + pgvector HNSW. Recall@10 is against the exact search over all vectors.

Data: Fashion-MNIST train (60,000) with test queries and the CIFAR-10 subset, Lite0 embeddings cached
under DATA_DIR/cache; 1M and 10M synthetic vectors (`synthetic_chunk`), 10M built in chunks
(`indexes_10m`).
"""

import sys
import time
from collections.abc import Callable, Iterator
from functools import partial

import faiss
import numpy as np

from backend.core.config import Settings
from backend.core.vectors import PrototypeMatrix, StoredVectors, l2_normalise
from backend.embedding.cache import model_cache
from backend.evaluation.retrieval import embed_cached
from backend.index.category_index import CategoryIndex
from backend.index.layout import IndexLayout
from backend.search.build import index_class
from backend.sources.datasets import load_dataset
from backend.storage.engine import libpq_url
from benchmarks.harness import DIM

K, TOP_C, TARGET_RECALL = 10, 3, 0.97
NPROBES = (8, 16, 24, 32, 48, 64, 96)
EF_SEARCH = (8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)
SINGLES = 300  # single queries timed per configuration
SHORTLIST = 50  # re-ranked candidates (ivf pq; fastscan sweeps its own, RERANK_CANDIDATES' default 100 among them)
PG_QUERIES = 300  # pgvector: recall over the first queries only (each is a SQL round trip)


def log(message: str) -> None:
    print(f"  indexes: {message}", file=sys.stderr, flush=True)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def latency(one: Callable[[int], object], n_queries: int, singles: int = SINGLES) -> dict[str, float]:
    one(0)
    ms = []
    for i in range(singles):
        t = time.perf_counter()
        one(i % n_queries)
        ms.append((time.perf_counter() - t) * 1000)
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95))}


def row(
    method: str, knob: str, found: np.ndarray, truth: np.ndarray, lat: dict, memory: int, build_s: float, p10: float | None
) -> dict:
    return {
        "method": method,
        "knob": knob,
        "recall@10": recall(found, truth),
        "P@10": p10,
        **lat,
        "memory_mb": memory / 2**20,
        "build_s": build_s,
    }


def precision(found: np.ndarray, labels: np.ndarray | None, q_labels: np.ndarray | None) -> float | None:
    if labels is None or q_labels is None:
        return None
    return float(np.mean(np.where(found >= 0, labels[np.maximum(found, 0)] == q_labels[:, None], False)))


def ours(
    stored: StoredVectors,
    q: np.ndarray,
    truth: np.ndarray,
    spec: IndexLayout,
    q_labels: np.ndarray | None,
    labels: np.ndarray | None,
) -> list[dict]:
    """Our index at C=3 over an nprobe sweep (flat: one setting, every list of the top categories)."""
    t = time.perf_counter()
    n_cat = int(stored.category_ids.max()) + 1
    index = index_class(spec.kind).build(
        "bench", q.shape[1], list(range(n_cat)), stored, PrototypeMatrix.of(stored.category_ids, stored.vectors), spec
    )
    build_s = time.perf_counter() - t
    return sweep_ours(index, q, truth, spec, build_s, q_labels, labels)


def sweep_ours(
    index: CategoryIndex,
    q: np.ndarray,
    truth: np.ndarray,
    spec: IndexLayout,
    build_s: float,
    q_labels=None,
    labels=None,
    shortlist: int = SHORTLIST,
    nprobes: tuple[int, ...] = NPROBES,
) -> list[dict]:
    """Our index at C=3 over `nprobes` (each timed one query at a time), stopping once recall is within 0.002
    of its ceiling (every list of the top categories scanned)."""
    rows = []
    _, top = index.rank_categories(q, TOP_C)
    # What scanning every list of the top categories reaches: more nprobe cannot do better.
    ceiling = recall(index.search(q, K, top, None, shortlist).ids, truth) if spec.kind != "flat" else 1.0
    for nprobe in nprobes if spec.kind != "flat" else (None,):

        def one(i: int, nprobe: int | None = nprobe) -> None:
            _, cats = index.rank_categories(q[i : i + 1], TOP_C)
            index.search(q[i : i + 1], K, cats, nprobe, shortlist)

        _, cats = index.rank_categories(q, TOP_C)
        found = index.search(q, K, cats, nprobe, shortlist).ids
        codec = f"{spec.codec}x4" if spec.kind == "fastscan" else spec.codec
        name = f"ours {spec.kind} {codec} C={TOP_C}" + (f" list {spec.list_size}" if spec.kind != "flat" else "")
        name += f" +{spec.rerank} rerank {shortlist}" if spec.rerank != "none" else ""
        name += f", rerank {shortlist}" if spec.kind == "fastscan" else ""
        r = row(
            name,
            f"nprobe {nprobe}" if nprobe else "all lists",
            found,
            truth,
            latency(one, len(q)),
            index.memory_bytes(),
            build_s,
            precision(found, labels, q_labels),
        )
        rows.append(r)
        r["ceiling"] = ceiling
        if r["recall@10"] >= ceiling - 0.002:
            break
    return rows


def hnsw(x: np.ndarray, q: np.ndarray, truth: np.ndarray, q_labels=None, labels=None) -> list[dict]:
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    build_s = time.perf_counter() - t
    memory = x.nbytes + index.ntotal * 32 * 2 * 4  # vectors + level-0 links (2M int32 each)
    rows = []
    for ef in EF_SEARCH:
        index.hnsw.efSearch = ef
        found = index.search(q, K)[1]
        rows.append(
            row(
                "FAISS HNSWFlat M=32, all vectors",
                f"efSearch {ef}",
                found,
                truth,
                latency(lambda i: index.search(q[i : i + 1], K), len(q)),
                memory,
                build_s,
                precision(found, labels, q_labels),
            )
        )
        if rows[-1]["recall@10"] >= 0.995:
            break
    return rows


def exact(x: np.ndarray, q: np.ndarray, q_labels=None, labels=None) -> tuple[np.ndarray, dict]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    truth = index.search(q, K)[1]
    return truth, row(
        "exact flat scan, all vectors",
        "",
        truth,
        truth,
        latency(lambda i: index.search(q[i : i + 1], K), len(q), 100),
        x.nbytes,
        0.0,
        precision(truth, labels, q_labels),
    )


def pgvector(x: np.ndarray, q: np.ndarray, truth: np.ndarray, q_labels=None, labels=None) -> list[dict]:
    """PostgreSQL + pgvector HNSW (m 16, ef_construction 64), ORDER BY inner product over a local socket."""
    import psycopg

    from benchmarks.harness import TempDatabase

    rows = []
    with TempDatabase() as db:
        url = libpq_url(db.engine)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
            conn.execute(f"CREATE TABLE items (id bigint PRIMARY KEY, embedding vector({x.shape[1]}))")
            # Binary COPY: pgvector's binary form is int16 dim, int16 0, float4 big-endian each.
            rec = np.dtype(
                [
                    ("n", ">i2"),
                    ("l1", ">i4"),
                    ("id", ">i8"),
                    ("l2", ">i4"),
                    ("dim", ">i2"),
                    ("unused", ">i2"),
                    ("v", ">f4", (x.shape[1],)),
                ]
            )
            data = np.zeros(len(x), dtype=rec)
            data["n"], data["l1"], data["id"], data["l2"], data["dim"], data["v"] = (
                2,
                8,
                np.arange(len(x)),
                4 + 4 * x.shape[1],
                x.shape[1],
                x,
            )
            with conn.cursor().copy("COPY items FROM STDIN (FORMAT binary)") as copy:
                copy.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + data.tobytes() + b"\xff\xff")
            conn.execute("SET maintenance_work_mem = '4GB'")
            t = time.perf_counter()
            conn.execute("CREATE INDEX ON items USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64)")
            build_s = time.perf_counter() - t
            memory = conn.execute(
                "SELECT pg_relation_size(indexrelid) FROM pg_index WHERE indrelid = 'items'::regclass AND NOT indisprimary"
            ).fetchone()[0]
            conn.execute("ANALYZE items")
            conn.execute("SET enable_seqscan = off")  # small tables: the planner would scan them whole instead
            texts = ["[" + ",".join(f"{v:.7g}" for v in vec) + "]" for vec in q[:PG_QUERIES]]
            plan = conn.execute("EXPLAIN SELECT id FROM items ORDER BY embedding <#> %s::vector LIMIT 10", (texts[0],)).fetchall()
            assert any("Index Scan" in line[0] for line in plan), "pgvector's HNSW index is not used"
            for ef in (16, 40, 64, 100):
                conn.execute(f"SET hnsw.ef_search = {ef}")
                sql = "SELECT id FROM items ORDER BY embedding <#> %s::vector LIMIT 10"

                def one(i: int, sql: str = sql) -> list:
                    return conn.execute(sql, (texts[i],)).fetchall()

                found = np.array([[r[0] for r in one(i)] for i in range(PG_QUERIES)])
                rows.append(
                    row(
                        "PostgreSQL + pgvector HNSW m=16",
                        f"ef_search {ef}",
                        found,
                        truth[: len(found)],
                        latency(one, PG_QUERIES),
                        memory,
                        build_s,
                        precision(found, labels, q_labels[: len(found)] if q_labels is not None else None),
                    )
                )
    return rows


def compare(
    name: str,
    stored: StoredVectors,
    q: np.ndarray,
    q_labels: np.ndarray | None,
    specs: list[IndexLayout],
    with_pgvector: bool,
    with_hnsw: bool = True,
    more_rows: Callable[..., list[dict]] | None = None,  # (stored, q, truth, q_labels, labels): e.g. fastscan's
) -> dict:
    labels = stored.category_ids if q_labels is not None else None
    log(f"{name}: {len(stored):,} vectors, {len(q):,} queries")
    truth, exact_row = exact(stored.vectors, q, q_labels, labels)
    rows = [exact_row]
    for spec in specs:
        rows += ours(stored, q, truth, spec, q_labels, labels)
        log(f"{name}: {rows[-1]['method']} done")
    if more_rows is not None:
        rows += more_rows(stored, q, truth, q_labels, labels)
    if with_hnsw:
        rows += hnsw(stored.vectors, q, truth, q_labels, labels)
        log(f"{name}: HNSW done")
    if with_pgvector:
        rows += pgvector(stored.vectors, q, truth, q_labels, labels)
        log(f"{name}: pgvector done")
    return {"name": name, "vectors": len(stored), "queries": len(q), "rows": rows, "goal": goal(rows)}


def goal(rows: list[dict]) -> dict:
    """Ours at C=3 and recall >= TARGET: the fastest such setting, against HNSW tuned to the same recall."""
    ours_ok = [r for r in rows if r["method"].startswith("ours") and r["recall@10"] >= TARGET_RECALL]
    if not ours_ok:
        best = max((r for r in rows if r["method"].startswith("ours")), key=lambda r: r["recall@10"])
        return {
            "met": False,
            "why": f"no two-stage C={TOP_C} setting reaches recall {TARGET_RECALL} (best {best['recall@10']:.3f}: "
            f"the top-{TOP_C} categories hold only that share of the true neighbours)",
        }
    fastest = min(ours_ok, key=lambda r: r["p50"])
    tuned = [r for r in rows if r["method"].startswith("FAISS HNSW") and r["recall@10"] >= fastest["recall@10"]]
    if not tuned:
        return {"met": True, "ours": fastest, "why": "HNSW did not reach that recall in the sweep"}
    hn = min(tuned, key=lambda r: r["p50"])
    return {"met": fastest["p50"] <= hn["p50"], "ours": fastest, "hnsw": hn, "ratio": fastest["p50"] / hn["p50"]}


# --- data ---------------------------------------------------------------------------------------------


def real(
    settings: Settings, dataset: str, query_limit: int | None, train_limit: int | None = None
) -> tuple[StoredVectors, np.ndarray, np.ndarray]:
    embedder = model_cache.get(settings)
    train = load_dataset(dataset, None, "train", train_limit, settings)
    test = load_dataset(dataset, None, "test", query_limit, settings)
    catalogue = embed_cached(train, embedder, settings)
    queries = embed_cached(test, embedder, settings)
    q_labels = np.array([catalogue.names.index(queries.names[i]) for i in queries.labels])
    stored = StoredVectors(np.arange(len(catalogue.labels), dtype=np.int64), catalogue.labels, catalogue.vectors)
    return stored, queries.vectors, q_labels


SYNTH_CATEGORIES, SYNTH_CLUSTERS, SYNTH_CONFUSED = 100, 40, 0.15


def synthetic_chunk(start: int, stop: int, seed: int = 0, dim: int = DIM) -> StoredVectors:
    """Vectors start..stop of a deterministic synthetic catalogue: SYNTH_CATEGORIES random category
    directions; each category has SYNTH_CLUSTERS sub-clusters, each leaning a random share (0-0.8) towards
    another category; a vector is its sub-cluster's centre plus isotropic noise, L2-normalised, and 15 % of
    vectors carry the label of the category their sub-cluster leans to, so that neighbours cross category
    lines as on real data. Any chunk can be made again alone."""
    base = np.random.default_rng(seed)
    cats = l2_normalise(base.standard_normal((SYNTH_CATEGORIES, dim), dtype=np.float32))
    lean_to = base.integers(0, SYNTH_CATEGORIES, (SYNTH_CATEGORIES, SYNTH_CLUSTERS))
    lean = base.uniform(0, 0.8, (SYNTH_CATEGORIES, SYNTH_CLUSTERS, 1)).astype(np.float32)
    offsets = l2_normalise(base.standard_normal((SYNTH_CATEGORIES, SYNTH_CLUSTERS, dim), dtype=np.float32))
    centres = cats[:, None, :] + lean * cats[lean_to] + 0.6 * offsets
    ids = np.arange(start, stop, dtype=np.int64)
    rng = np.random.default_rng([seed, start])
    owner = ids % SYNTH_CATEGORIES
    cluster = rng.integers(0, SYNTH_CLUSTERS, len(ids))
    x = centres[owner, cluster] + 0.75 * l2_normalise(rng.standard_normal((len(ids), dim), dtype=np.float32))
    # Labels are not geometry: 1 vector in SYNTH_CONFUSED carries the category its sub-cluster leans to.
    confused = rng.random(len(ids)) < SYNTH_CONFUSED
    category = np.where(confused, lean_to[owner, cluster], owner)
    return StoredVectors(ids, category, l2_normalise(x))


def synthetic_catalogue(n: int) -> StoredVectors:
    """The first n vectors of the synthetic catalogue, in memory (made 100k at a time)."""
    return StoredVectors.concat([synthetic_chunk(s, e) for s, e in chunks(n, 100_000)])


def synthetic_queries(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    chunk = synthetic_chunk(10**12, 10**12 + n, seed)  # ids far beyond the catalogue: fresh noise
    return chunk.vectors, chunk.category_ids


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def run(settings: Settings, quick: bool, sizes: tuple[str, ...] = ("real", "1M", "10M")) -> list[dict]:
    real_specs = [
        IndexLayout("flat"),
        IndexLayout("ivf", "float32", 64),
        IndexLayout("ivf", "float16", 64),
        IndexLayout("ivf", "sq8", 64),
        IndexLayout("ivf", "pq128", 64, rerank="float32"),
    ]
    from benchmarks.sections import indexes_fastscan as fs

    out = []
    if "real" in sizes:
        # --quick: a smoke run on 300 + 60 images (embedding all 6,000 took minutes on a busy machine)
        stored, q, ql = real(settings, "cifar10", 60 if quick else None, 300 if quick else None)
        small = partial(fs.rows, list_size=64, ms=(320,), shortlists=(50,))
        out.append(fs.with_fastscan(compare("CIFAR-10 subset (Lite0)", stored, q, ql, real_specs[:2], not quick, True, small)))
        if not quick:
            stored, q, ql = real(settings, "fashion-mnist", None)
            out.append(fs.with_fastscan(compare("Fashion-MNIST train (Lite0)", stored, q, ql, real_specs, True, True, fs.rows)))
    if "1M" in sizes and not quick:
        stored = synthetic_catalogue(1_000_000)
        q, ql = synthetic_queries(1000)
        out.append(
            compare(
                "synthetic 1,000,000",
                stored,
                q,
                ql,
                [
                    IndexLayout("flat"),
                    IndexLayout("ivf", "float32", 256),
                    IndexLayout("ivf", "sq8", 256),
                    IndexLayout("ivf", "pq128", 256, rerank="float32"),
                ],
                with_pgvector=False,
                more_rows=fs.rows,
            )
        )
        fs.with_fastscan(out[-1])
        del stored
    if "10M" in sizes and not quick:
        from benchmarks.sections import indexes_10m

        out.append(indexes_10m.ten_million(10_000_000, IndexLayout("ivf", "sq8", 1024)))
        out.append(fs.ten_million(10_000_000))
    return out
