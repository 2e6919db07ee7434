"""Backups: a round trip through pg_dump / pg_restore gives back the same catalogue, and the index caches
built for the contents that were replaced are never believed afterwards."""

import subprocess
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from backend.core.search_params import SearchParams
from backend.imaging import decode_image
from backend.services.assembly import Services
from backend.services.keys import list_keys
from backend.services.search import SearchService
from backend.sources.datasets import Dataset
from backend.storage import catalogue, change_log
from backend.storage.engine import session_scope
from tests.utils.catalogue import fill
from tests.utils.cli import run_cli
from tests.utils.settings import make_settings


def _cli(engine: Engine, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli({"DATABASE_URL": engine.url.render_as_string(hide_password=False), "DATA_DIR": str(data_dir)}, *args)


def _snapshot(service: SearchService, query: np.ndarray) -> dict:
    with session_scope(service.engine) as session:
        counts = catalogue.category_counts(session)
        protos = catalogue.load_prototypes(session, service.model)
        keys = len(list_keys(session))
    (result,) = service.search_vectors(query[None, :], SearchParams(limit=10, top_categories=3, use_prototypes=True))
    return {
        "counts": counts,
        "prototype_ids": protos.category_ids.tolist(),
        "prototypes": np.round(protos.vectors, 5).tolist(),
        "prototype_counts": protos.counts.tolist(),
        "keys": keys,
        "search": [(h.image_id, h.category, round(h.score, 5)) for h in result.results],
    }


def test_backup_restores_an_identical_catalogue(
    databases, embedder, cifar_train: Dataset, cifar_queries: Dataset, tmp_path: Path
) -> None:
    engine = databases.new()
    fill(engine, embedder, cifar_train.samples, 80)
    data = tmp_path / "data"
    assert _cli(engine, data, "api-key", "create", "--name", "ops", "--scope", "admin").returncode == 0
    service = SearchService(make_settings(data, engine), engine, embedder)
    query = embedder.embed([decode_image(cifar_queries.samples[0].load(), 10**7).rgb])[0]
    before = _snapshot(service, query)
    with session_scope(engine) as session:
        old_identity = change_log.identity(session)

    dump = tmp_path / "catalogue.dump"
    r = _cli(engine, data, "backup", str(dump))
    assert r.returncode == 0 and dump.stat().st_size > 10_000, r.stderr
    assert not list(tmp_path.glob(".*partial"))

    # Change the catalogue after the backup: delete two images, add others, and let the cache follow.
    ids = [h[0] for h in before["search"][:2]]
    for image_id in ids:
        Services.around(service).writes.delete(image_id)
    fill(engine, embedder, cifar_train.samples[80:], 20)
    service.cache.refresh()
    service.cache.save()
    assert _snapshot(service, query) != before

    r = _cli(engine, data, "restore", str(dump), "--yes")
    assert r.returncode == 0, r.stderr
    engine.dispose()
    # A new process (new service) over the restored database: the saved cache is for other contents.
    restored = SearchService(make_settings(data, engine), engine, embedder)
    after = _snapshot(restored, query)
    assert after == before
    assert "rebuilt from database" in restored.cache.origin  # the cache saved after the backup is not believed
    with session_scope(engine) as session:
        assert change_log.identity(session).catalogue_id != old_identity.catalogue_id

    # The running service notices too: its next refresh rebuilds from the restored database.
    report = service.cache.refresh()
    assert report.kind == "full"
    assert _snapshot(service, query)["search"] == before["search"]


def test_a_failed_restore_changes_nothing(databases, embedder, cifar_train: Dataset, tmp_path: Path) -> None:
    engine = databases.new()
    fill(engine, embedder, cifar_train.samples, 20)
    broken = tmp_path / "broken.dump"
    assert _cli(engine, tmp_path, "backup", str(broken)).returncode == 0
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # truncated: the archive lists, the data fails
    r = _cli(engine, tmp_path, "restore", str(broken), "--yes")
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with session_scope(engine) as session:
        assert sum(c[2] for c in catalogue.category_counts(session)) == 20
