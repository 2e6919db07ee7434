"""Writes: ingestion (resume, dedup, atomic batches), upload, delete and prototype bookkeeping."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Engine, func, select

from backend import catalogue
from backend.core.errors import InvalidInput, Unprocessable
from backend.core.search_params import SearchParams
from backend.datasets import Dataset, Sample, balanced
from backend.db.models import Embedding, Prototype
from backend.db.models import Image as ImageRow
from backend.db.session import session_scope
from backend.imaging import decode_image
from backend.ingest import ingest
from backend.services.search import SearchService
from tests.utils.images import png
from tests.utils.settings import make_settings


def counts(engine: Engine) -> tuple[int, int, int]:
    with session_scope(engine) as s:
        return (
            s.scalar(select(func.count()).select_from(ImageRow)),
            s.scalar(select(func.count()).select_from(Embedding)),
            s.scalar(select(func.coalesce(func.sum(Prototype.count), 0))),
        )


@pytest.fixture
def small(cifar_train: Dataset) -> Dataset:
    return Dataset("cifar10", balanced(cifar_train.samples, 40))


@pytest.fixture
def service(engine: Engine, embedder, small: Dataset, tmp_path: Path) -> SearchService:
    ingest(small, embedder, engine, max_pixels=10**7, progress=False)
    return SearchService(make_settings(tmp_path, engine), engine, embedder)


def test_rerun_resumes_without_duplicates(engine: Engine, embedder, small: Dataset) -> None:
    first = Dataset("cifar10", small.samples[:25])
    assert ingest(first, embedder, engine, 10**7, batch_size=10, progress=False).added == 25
    report = ingest(small, embedder, engine, 10**7, batch_size=10, progress=False)
    assert (report.added, report.already_stored) == (15, 25)
    assert counts(engine) == (40, 40, 40)


def test_failed_batch_leaves_database_unchanged(engine: Engine, embedder, small: Dataset, monkeypatch) -> None:
    ingest(Dataset("cifar10", small.samples[:10]), embedder, engine, 10**7, progress=False)
    before = counts(engine)

    def fail_after_insert(*args, **kwargs):
        raise RuntimeError("simulated crash while writing prototypes")

    monkeypatch.setattr(catalogue, "_update_prototypes", fail_after_insert)
    with pytest.raises(RuntimeError):
        ingest(Dataset("cifar10", small.samples[10:]), embedder, engine, 10**7, progress=False)
    assert counts(engine) == before  # images and embeddings of the failed batch rolled back too


def test_unreadable_files_are_counted_not_fatal(engine: Engine, embedder, small: Dataset) -> None:
    junk = [Sample("cat", "junk-1", lambda: b"not an image"), Sample("cat", "junk-2", lambda: b"")]
    report = ingest(Dataset("x", small.samples[:5] + junk), embedder, engine, 10**7, progress=False)
    assert (report.added, report.invalid) == (5, 2)
    assert "junk-1: not an image" in report.errors[0]


def test_prototypes_are_exact_running_means(service: SearchService, engine: Engine) -> None:
    with session_scope(engine) as s:
        stored = catalogue.load_vectors(s, service.model)
        protos = catalogue.load_prototypes(s, service.model)
    for cid, vec, n in zip(protos.category_ids, protos.vectors, protos.counts, strict=True):
        members = stored.vectors[stored.category_ids == cid]
        assert n == len(members)
        mean = members.astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(vec, mean / np.linalg.norm(mean), atol=1e-6)


def test_upload_with_category_is_searchable_at_once(service: SearchService, engine: Engine, cifar_queries: Dataset) -> None:
    sample = next(s for s in cifar_queries.samples if s.label == "ship")
    image = decode_image(sample.load(), 10**7)
    before = counts(engine)
    result = service.upload(image, "ship", "a test ship")
    assert (result.duplicate, result.category, result.label_given) == (False, "ship", True)
    assert counts(engine) == (before[0] + 1, before[1] + 1, before[2] + 1)
    hit = service.search([image.rgb], SearchParams(limit=1, top_categories=1, use_prototypes=False))[0].results[0]
    assert (hit.image_id, round(hit.score, 4)) == (result.image_id, 1.0)
    assert service.cache.is_current()


def test_upload_without_category_is_predicted_and_not_a_prototype(
    service: SearchService, engine: Engine, cifar_queries: Dataset
) -> None:
    image = decode_image(cifar_queries.samples[0].load(), 10**7)
    before = counts(engine)
    result = service.upload(image, None)
    assert result.label_given is False and result.category is not None and result.category_score is not None
    assert counts(engine) == (before[0] + 1, before[1] + 1, before[2])  # prototype sums untouched


def test_duplicate_upload_names_the_stored_image(service: SearchService, engine: Engine, small: Dataset) -> None:
    image = decode_image(small.samples[0].load(), 10**7)
    before = counts(engine)
    result = service.upload(image, "cat")
    assert result.duplicate and result.category == small.samples[0].label
    assert counts(engine) == before


def test_unknown_category_is_refused_and_nothing_stored(service: SearchService, engine: Engine, cifar_queries: Dataset) -> None:
    before = counts(engine)
    with pytest.raises(Unprocessable, match="unknown category 'spaceship'"):
        service.upload(decode_image(cifar_queries.samples[1].load(), 10**7), "spaceship")
    assert counts(engine) == before


def test_upload_without_category_into_empty_catalogue_is_refused(engine: Engine, embedder, tmp_path: Path) -> None:
    service = SearchService(make_settings(tmp_path, engine), engine, embedder)
    with pytest.raises(InvalidInput, match="no category prototypes yet"):
        service.upload(decode_image(png(Image.new("RGB", (40, 40), "red")), 10**7), None)
    assert counts(engine) == (0, 0, 0)


def test_delete_updates_database_prototypes_and_index(service: SearchService, engine: Engine, small: Dataset) -> None:
    index = service.cache.get()
    with session_scope(engine) as s:
        victim = s.scalar(select(ImageRow.id).order_by(ImageRow.id).limit(1))
        cid = s.get(ImageRow, victim).category_id
    total = index.ntotal
    service.delete(victim)
    assert index.ntotal == total - 1
    assert counts(engine) == (39, 39, 39)
    with session_scope(engine) as s:
        protos = catalogue.load_prototypes(s, service.model)
    assert protos.counts[list(protos.category_ids).index(cid)] == 3
    results = service.search_vectors(
        np.eye(1, index.dim, dtype=np.float32), SearchParams(limit=50, top_categories=10, use_prototypes=False)
    )[0].results
    assert victim not in [h.image_id for h in results]
    assert service.cache.is_current()


def test_search_on_an_empty_catalogue_returns_nothing(engine: Engine, embedder, tmp_path: Path) -> None:
    service = SearchService(make_settings(tmp_path, engine), engine, embedder)
    image = decode_image(png(Image.new("RGB", (40, 40), "red")), 10**7)
    for use_prototypes in (True, False):
        result = service.search([image.rgb], SearchParams(limit=5, top_categories=3, use_prototypes=use_prototypes))[0]
        assert result.results == [] and result.vectors_total == 0
    assert service.rank_categories([image.rgb])[0] == [[]]
