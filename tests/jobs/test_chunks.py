"""One chunk run in this process (no worker processes): an item without a category gets the category the
stored prototypes predict, stored as predicted, as an upload's would be; with no prototypes yet it is one
counted failure; a second delivery of a finished chunk does nothing."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select

from backend import jobs
from backend.sources.datasets import Dataset
from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.schema import CatalogueJob, Category, Image
from tests.utils.catalogue import fill
from tests.utils.http_images import serving
from tests.utils.settings import make_settings

CHUNK = 8


@pytest.fixture(scope="module")
def image_server(cifar_queries: Dataset) -> Iterator[str]:
    with serving({f"/img{i}": s.load() for i, s in enumerate(cifar_queries.samples[:6])}) as base:
        yield base


def run_url_job(engine: Engine, embedder, tmp_path: Path, text: str) -> jobs.ChunkRunner:
    settings = make_settings(tmp_path, engine, job_chunk_size=CHUNK, allow_private_urls=True)
    job_id = jobs.create_job(settings, engine, "urls", embedder.model_id, {}, None)
    queue = jobs.open_queue(engine)
    try:
        jobs.stage_urls(settings, engine, queue, job_id, text)
    finally:
        queue.close()
    runner = jobs.ChunkRunner(settings, engine)
    runner.embedder = lambda model_name=None: embedder  # the session's loaded model, not a second one
    return runner


def test_an_item_without_a_category_is_predicted_from_the_stored_prototypes(
    engine: Engine, embedder, cifar_train: Dataset, image_server, tmp_path: Path
) -> None:
    fill(engine, embedder, cifar_train.samples, 40)
    base = image_server
    text = "\n".join([f"{base}/img0", f"{base}/img1,ship", f"{base}/img2"])
    runner = run_url_job(engine, embedder, tmp_path, text)
    with session_scope(engine) as s:
        job_id = s.scalar(select(CatalogueJob.id))
        protos_before = catalogue.load_prototypes(s, embedder.model_id)
    report = runner.run(job_id, 0)
    assert report is not None and (report.added, report.duplicates, report.failed) == (3, 0, 0)
    assert runner.run(job_id, 0) is None  # delivered twice: the second does nothing
    job = jobs.get_job(engine, job_id)
    assert (job.state, job.added, job.done) == ("succeeded", 3, 3)
    with session_scope(engine) as s:
        rows = s.execute(
            select(Image.id, Category.name, Image.label_given).join(Category).where(Image.id.in_(report.ids)).order_by(Image.id)
        ).all()
        protos_after = catalogue.load_prototypes(s, embedder.model_id)
        vectors = np.stack([catalogue.image_vector(s, i, embedder.model_id) for i, _, _ in rows])
        names = {cid: name for name, cid in catalogue.category_ids(s).items()}
    assert [r.label_given for r in rows] == [False, True, False] and rows[1].name == "ship"
    # predicted: the prototype nearest each vector, and only the given label moved a prototype
    expected = protos_before.category_ids[(vectors @ protos_before.vectors.T).argmax(axis=1)]
    assert [rows[0].name, rows[2].name] == [names[int(expected[0])], names[int(expected[2])]]
    assert protos_after.counts.sum() == protos_before.counts.sum() + 1


def test_without_prototypes_an_item_without_a_category_is_one_counted_failure(
    engine: Engine, embedder, image_server, tmp_path: Path
) -> None:
    base = image_server
    runner = run_url_job(engine, embedder, tmp_path, "\n".join([f"{base}/img3", f"{base}/img4,cat"]))
    with session_scope(engine) as s:
        job_id = s.scalar(select(CatalogueJob.id))
    report = runner.run(job_id, 0)
    assert report is not None and (report.added, report.failed) == (1, 1)
    assert "no category prototypes yet" in report.failures[0]["reason"]
    job = jobs.get_job(engine, job_id)
    assert (job.state, job.added, job.failed, job.done) == ("succeeded", 1, 1, 2)
