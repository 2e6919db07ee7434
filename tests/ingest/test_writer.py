"""The batch writer's guarantees, through populate and upload: resume, de-duplication by sha256, whole
batches only, unreadable files counted, exact prototype sums, and one policy for an upload without a
category (predicted, not a prototype)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Engine

from backend.core.errors import InvalidInput, Unprocessable
from backend.core.search_params import SearchParams
from backend.imaging import decode_image
from backend.ingest.categories import LiveStage1, StoredPrototypes
from backend.ingest.populate import ingest
from backend.search.stage1 import Stage1
from backend.services.search import SearchService
from backend.sources.datasets import Dataset, Sample
from backend.storage import catalogue, vector_reader
from backend.storage.engine import session_scope
from tests.utils.catalogue import row_counts
from tests.utils.images import png
from tests.utils.settings import make_settings


def test_rerun_resumes_without_duplicates(engine: Engine, embedder, small: Dataset) -> None:
    first = Dataset("cifar10", small.samples[:25])
    assert ingest(first, embedder, engine, 10**7, batch_size=10, progress=False).added == 25
    report = ingest(small, embedder, engine, 10**7, batch_size=10, progress=False)
    assert (report.added, report.duplicates) == (15, 25)
    assert row_counts(engine) == (40, 40, 40)


def test_failed_batch_leaves_database_unchanged(engine: Engine, embedder, small: Dataset, monkeypatch) -> None:
    ingest(Dataset("cifar10", small.samples[:10]), embedder, engine, 10**7, progress=False)
    before = row_counts(engine)

    def fail_after_insert(*args, **kwargs):
        raise RuntimeError("simulated crash while writing prototypes")

    monkeypatch.setattr(catalogue, "_update_prototypes", fail_after_insert)
    with pytest.raises(RuntimeError):
        ingest(Dataset("cifar10", small.samples[10:]), embedder, engine, 10**7, progress=False)
    assert row_counts(engine) == before  # images and embeddings of the failed batch rolled back too


def test_unreadable_files_are_counted_not_fatal(engine: Engine, embedder, small: Dataset) -> None:
    junk = [Sample("cat", "junk-1", lambda: b"not an image"), Sample("cat", "junk-2", lambda: b"")]
    report = ingest(Dataset("x", small.samples[:5] + junk), embedder, engine, 10**7, progress=False)
    assert (report.added, report.failed) == (5, 2)
    assert report.failures[0]["source"] == "junk-1" and "junk-1: not an image" in report.failures[0]["reason"]


def test_prototypes_are_exact_running_means(writable_service: SearchService, engine: Engine) -> None:
    with session_scope(engine) as s:
        stored = vector_reader.load_vectors(s, writable_service.model)
        protos = catalogue.load_prototypes(s, writable_service.model)
    for cid, vec, n in zip(protos.category_ids, protos.vectors, protos.counts, strict=True):
        members = stored.vectors[stored.category_ids == cid]
        assert n == len(members)
        mean = members.astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(vec, mean / np.linalg.norm(mean), atol=1e-6)


def test_upload_with_category_is_searchable_at_once(
    writable_service: SearchService, engine: Engine, cifar_queries: Dataset
) -> None:
    sample = next(s for s in cifar_queries.samples if s.label == "ship")
    image = decode_image(sample.load(), 10**7)
    before = row_counts(engine)
    result = writable_service.upload(image, "ship", "a test ship")
    assert (result.duplicate, result.category, result.label_given) == (False, "ship", True)
    assert row_counts(engine) == (before[0] + 1, before[1] + 1, before[2] + 1)
    hit = writable_service.search([image.rgb], SearchParams(limit=1, top_categories=1, use_prototypes=False))[0].results[0]
    assert (hit.image_id, round(hit.score, 4)) == (result.image_id, 1.0)
    assert writable_service.cache.is_current()


def test_upload_without_category_is_predicted_and_not_a_prototype(
    writable_service: SearchService, engine: Engine, cifar_queries: Dataset
) -> None:
    image = decode_image(cifar_queries.samples[0].load(), 10**7)
    before = row_counts(engine)
    result = writable_service.upload(image, None)
    assert result.label_given is False and result.category is not None and result.category_score is not None
    assert row_counts(engine) == (before[0] + 1, before[1] + 1, before[2])  # prototype sums untouched


def test_duplicate_upload_names_the_stored_image(writable_service: SearchService, engine: Engine, small: Dataset) -> None:
    image = decode_image(small.samples[0].load(), 10**7)
    before = row_counts(engine)
    result = writable_service.upload(image, "cat")
    assert result.duplicate and result.category == small.samples[0].label
    assert row_counts(engine) == before


def test_unknown_category_is_refused_and_nothing_stored(
    writable_service: SearchService, engine: Engine, cifar_queries: Dataset
) -> None:
    before = row_counts(engine)
    with pytest.raises(Unprocessable, match="unknown category 'spaceship'"):
        writable_service.upload(decode_image(cifar_queries.samples[1].load(), 10**7), "spaceship")
    assert row_counts(engine) == before


def test_upload_without_category_into_empty_catalogue_is_refused(engine: Engine, embedder, tmp_path: Path) -> None:
    writable_service = SearchService(make_settings(tmp_path, engine), engine, embedder)
    with pytest.raises(InvalidInput, match="no category prototypes yet"):
        writable_service.upload(decode_image(png(Image.new("RGB", (40, 40), "red")), 10**7), None)
    assert row_counts(engine) == (0, 0, 0)


def test_a_worker_predicts_the_category_the_servers_prototype_stage_predicts(
    writable_service: SearchService, engine: Engine, cifar_queries: Dataset
) -> None:
    """One policy: the worker's stored prototypes rank as the index's prototype stage does."""
    vectors = writable_service.embed([decode_image(s.load(), 10**7).rgb for s in cifar_queries.samples[:8]])
    live = LiveStage1(writable_service.cache, Stage1(engine, writable_service.model, writable_service.embedder.dim, "prototype"))
    with session_scope(engine) as s:
        served, stored = live.predict(s, vectors), StoredPrototypes(writable_service.model).predict(s, vectors)
    assert served is not None and stored is not None
    assert [p.category_id for p in served] == [p.category_id for p in stored]
    np.testing.assert_allclose([p.score for p in served], [p.score for p in stored], atol=1e-5)
