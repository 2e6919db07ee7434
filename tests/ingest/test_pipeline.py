"""Pipelined ingestion: the same rows as the stages run one after the other, and no half-written batch
whichever stage fails (real PostgreSQL, real Lite0, real CIFAR-10 images)."""

import threading

import numpy as np
import pytest
from sqlalchemy import Engine, func, select

from backend.ingest.pipeline import run_pipeline
from backend.ingest.populate import ingest
from backend.sources.datasets import Dataset, Sample, balanced
from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.schema import Category, Embedding, Prototype
from backend.storage.schema import Image as ImageRow

BATCH = 16


def rows(engine: Engine, model: str) -> tuple[list[tuple], np.ndarray, list[tuple]]:
    """Every image row (with its category's name), the vectors in id order, the prototype counts."""
    with session_scope(engine) as s:
        images = s.execute(
            select(ImageRow.id, ImageRow.sha256, Category.name, ImageRow.label_given, ImageRow.source, ImageRow.width)
            .join(Category, ImageRow.category_id == Category.id)
            .order_by(ImageRow.id)
        ).all()
        vectors = [catalogue.image_vector(s, row[0], model) for row in images]
        protos = s.execute(
            select(Category.name, Prototype.count).join(Category, Prototype.category_id == Category.id).order_by(Category.name)
        ).all()
    return [tuple(r) for r in images], np.array(vectors), [tuple(p) for p in protos]


def counts(engine: Engine) -> tuple[int, int]:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(ImageRow)) or 0, s.scalar(
            select(func.count()).select_from(Embedding)
        ) or 0


@pytest.fixture
def mixed(cifar_train: Dataset) -> Dataset:
    """CIFAR-10 images with what ingestion must cope with: junk, and duplicates inside and across batches."""
    real = balanced(cifar_train.samples, 90)
    junk = [Sample("cat", "junk", lambda: b"not an image")]
    return Dataset("cifar10", [*real[:20], real[3], *junk, *real[20:], real[40], real[0]])


def test_pipelined_ingestion_stores_exactly_the_sequential_rows(databases, embedder, mixed: Dataset) -> None:
    sequential, pipelined = databases.new(), databases.new()
    a = ingest(mixed, embedder, sequential, 10**7, batch_size=BATCH, progress=False, pipelined=False)
    b = ingest(mixed, embedder, pipelined, 10**7, batch_size=BATCH, progress=False, pipelined=True)
    assert (a.added, a.duplicates, a.failed, a.failures) == (b.added, b.duplicates, b.failed, b.failures)
    assert (b.added, b.duplicates, b.failed) == (90, 3, 1)
    rows_a, vectors_a, protos_a = rows(sequential, embedder.model_id)
    rows_b, vectors_b, protos_b = rows(pipelined, embedder.model_id)
    assert rows_a == rows_b and protos_a == protos_b  # same ids, hashes, categories, sources, in the same order
    np.testing.assert_allclose(vectors_a, vectors_b, atol=1e-5)


@pytest.mark.parametrize("stage", ["decode", "embed", "write"])
def test_a_failure_in_any_stage_leaves_whole_batches_only(engine, embedder, cifar_train, monkeypatch, stage: str) -> None:
    samples = balanced(cifar_train.samples, 6 * BATCH)
    calls = {"n": 0}

    def third_call_fails(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError(f"simulated {stage} failure")
            return real(*args, **kwargs)

        return wrapped

    if stage == "decode":  # reading the third batch's first image fails (not an OSError: a bug, not bad data)

        def unreadable() -> bytes:
            raise RuntimeError("simulated decode failure")

        samples = [*samples[: 2 * BATCH], Sample(samples[2 * BATCH].label, "broken", unreadable), *samples[2 * BATCH + 1 :]]
    elif stage == "embed":
        monkeypatch.setattr(embedder, "embed_pixels", third_call_fails(embedder.embed_pixels))
    else:  # the third batch's transaction fails after its images and embeddings were inserted
        monkeypatch.setattr(catalogue, "_update_prototypes", third_call_fails(catalogue._update_prototypes))
    with pytest.raises(RuntimeError, match=f"simulated {stage} failure"):
        ingest(Dataset("cifar10", samples), embedder, engine, 10**7, batch_size=BATCH, progress=False)
    assert counts(engine) == (2 * BATCH, 2 * BATCH)  # the two batches before the failing one, whole; none after
    stored, _, protos = rows(engine, embedder.model_id)
    assert [r[4] for r in stored] == [s.source for s in samples[: 2 * BATCH]]
    assert sum(count for _, count in protos) == 2 * BATCH
    monkeypatch.undo()
    again = ingest(
        Dataset("cifar10", balanced(cifar_train.samples, 6 * BATCH)), embedder, engine, 10**7, batch_size=BATCH, progress=False
    )
    assert (again.added, again.duplicates) == (4 * BATCH, 2 * BATCH)  # the rerun resumes after them


def test_pipeline_keeps_order_and_bounds_the_work_ahead() -> None:
    written: list[int] = []
    in_flight = {"now": 0, "most": 0}
    lock = threading.Lock()

    def decode(n: int) -> int:
        with lock:
            in_flight["now"] += 1
            in_flight["most"] = max(in_flight["most"], in_flight["now"])
        return n

    def write(n: int) -> None:
        with lock:
            in_flight["now"] -= 1
        written.append(n)

    run_pipeline(range(50), decode, lambda n: n * 10, write, decoders=3, depth=2)
    assert written == [n * 10 for n in range(50)]
    # decoded but not yet written: `depth` futures, one being embedded, `depth` queued, one being written
    assert in_flight["most"] <= 2 * 2 + 2


def test_a_writer_failure_stops_the_pipeline() -> None:
    written: list[int] = []
    embedded: list[int] = []

    def write(n: int) -> None:
        if n == 5:
            raise ValueError("disk full")
        written.append(n)

    def embed(n: int) -> int:
        embedded.append(n)
        return n

    with pytest.raises(ValueError, match="disk full"):
        run_pipeline(range(1000), lambda n: n, embed, write, depth=2)
    assert written == [0, 1, 2, 3, 4] and len(embedded) < 20  # it stopped soon after, wrote nothing later
