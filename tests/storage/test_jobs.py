"""Job rows in the database (backend/storage/jobs.py): an unstaged job nobody stages is marked, then failed;
the staging lock keeps the sweeper off; a chunk's rows are written, loaded once, and then done."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from backend.jobs.staging import ORPHANED_AFTER_S, sweep_orphans
from backend.storage import jobs
from backend.storage.engine import session_scope
from backend.storage.schema import CatalogueJobItem


def test_an_orphaned_job_is_marked_then_failed_unless_its_staging_lock_is_held(engine: Engine) -> None:
    held = jobs.create_job(engine, "urls", "m", {}, None, "elsewhere:/data")
    orphan = jobs.create_job(engine, "urls", "m", {}, None, "gone:/data")
    with jobs.staging_lock(engine, held, wait=True) as got:
        assert got
        sweep_orphans(engine)
        assert jobs.get_job(engine, orphan).params["orphaned_since"] is not None
        assert jobs.get_job(engine, held).params.get("orphaned_since") is None
        long_ago = datetime.now(UTC) - timedelta(seconds=ORPHANED_AFTER_S + 60)
        with session_scope(engine) as session:
            for job_id in (held, orphan):
                jobs.set_params(session, job_id, orphaned_since=long_ago.isoformat())
        sweep_orphans(engine)
    failed, kept = jobs.get_job(engine, orphan), jobs.get_job(engine, held)
    assert failed.state == "failed" and "did not resume" in (failed.message or "") and failed.params["staged"]
    assert kept.state == "queued"
    with session_scope(engine) as session:
        assert [job_id for job_id, _ in jobs.unstaged_jobs(session)] == [held]
        assert [job_id for job_id, _ in jobs.unstaged_jobs(session, stager="elsewhere:/data")] == [held]
        assert jobs.unstaged_jobs(session, stager="another:/data") == []


def test_a_chunk_is_loaded_once_and_its_job_runs(engine: Engine) -> None:
    job_id = jobs.create_job(engine, "urls", "m", {"model_name": "lite0"}, None, None)
    with session_scope(engine) as session:
        items = [CatalogueJobItem(source=f"u{i}", url=f"http://example.invalid/{i}") for i in range(3)]
        jobs.add_chunk(session, job_id, 0, items)
    loaded = jobs.load_chunk(engine, job_id, 0)
    assert loaded is not None
    rows, model, model_name = loaded
    assert [r.source for r in rows] == ["u0", "u1", "u2"] and [r.item for r in rows] == [0, 1, 2]
    assert (model, model_name) == ("m", "lite0")
    assert jobs.get_job(engine, job_id).state == "running"
    with session_scope(engine) as session:
        mark = jobs.lock_chunk_mark(session, job_id, 0)
        assert mark is not None
        mark.finished_at = datetime.now(UTC)
        jobs.delete_chunk_items(session, job_id, 0)
    assert jobs.load_chunk(engine, job_id, 0) is None
