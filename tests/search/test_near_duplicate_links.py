"""Near-duplicate links as images arrive, over a real database, model and CIFAR-10 images: an upload writes
its links in its own transaction; a running server links what `populate` (no index) stored; the backfill
resumes after kill -9; and GET /duplicates' page is read from SQL under a statement timeout that a read of
every vector cannot meet."""

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select, text

from backend.core.vectors import StoredVectors
from backend.imaging import decode_image
from backend.ingest.categories import LiveStage1
from backend.ingest.populate import ingest
from backend.ingest.writer import BatchWriter
from backend.search import near_duplicates
from backend.services.assembly import Services
from backend.services.search import SearchService
from backend.sources.datasets import Dataset, Sample
from backend.storage import catalogue, vector_reader
from backend.storage import near_duplicates as links_table
from backend.storage.engine import make_engine, session_scope
from backend.storage.schema import NearDuplicateLink
from tests.utils.catalogue import fill
from tests.utils.cli import run_cli
from tests.utils.near_duplicates import check_groups, edited, numpy_groups, stored, wait_until
from tests.utils.server import running_server
from tests.utils.settings import CIFAR_SUBSET, make_settings

EDITS = ("flip", "resize", "brighten")


def links_of(engine: Engine, model: str, image_id: int) -> set[int]:
    with session_scope(engine) as s:
        rows = s.execute(
            select(NearDuplicateLink.image_a, NearDuplicateLink.image_b).where(
                NearDuplicateLink.model == model,
                (NearDuplicateLink.image_a == image_id) | (NearDuplicateLink.image_b == image_id),
            )
        )
        return {int(a) if b == image_id else int(b) for a, b in rows}


def copies(engine: Engine, vectors: StoredVectors, rows: list[int]) -> Dataset:
    """Edited copies of the stored images at `rows`, labelled with their originals' categories."""
    with session_scope(engine) as s:
        names = {cid: name for name, cid in catalogue.category_ids(s).items()}
        data = catalogue.image_data(s, [int(vectors.ids[r]) for r in rows])
    samples = []
    for r in rows:
        for edit in EDITS[:2]:
            made = edited(data[int(vectors.ids[r])], edit)
            samples.append(Sample(names[int(vectors.category_ids[r])], f"copy:{r}:{edit}", lambda made=made: made))
    return Dataset("copies", samples)


@pytest.fixture
def populated(engine: Engine, embedder, cifar_train: Dataset) -> Engine:
    """60 CIFAR-10 images and 8 edited copies of 4 of them, stored by `populate`'s writer: no links."""
    fill(engine, embedder, cifar_train.samples, 60)
    ingest(copies(engine, stored(engine, embedder.model_id), [3, 17, 31, 45]), embedder, engine, 10**7, progress=False)
    return engine


def cli_env(engine: Engine, embedder, tmp_path: Path, **extra: str) -> dict[str, str]:
    shutil.copytree(embedder.onnx_dir, tmp_path / "cache" / "onnx", dirs_exist_ok=True)
    url = engine.url.render_as_string(hide_password=False)
    return {**os.environ, "DATABASE_URL": url, "DATA_DIR": str(tmp_path), "CIFAR10_DIR": str(CIFAR_SUBSET), **extra}


def test_an_upload_writes_its_links_in_its_own_transaction(
    engine: Engine, embedder, cifar_train: Dataset, tmp_path: Path
) -> None:
    fill(engine, embedder, cifar_train.samples, 100)
    service = SearchService(make_settings(tmp_path, engine), engine, embedder)  # no tick runs: links come from uploads only
    service.cache.get()
    vectors, model = stored(engine, service.model), service.model
    original = int(vectors.ids[11])
    with session_scope(engine) as s:
        data = catalogue.image_data(s, [original])[original]
    done = service.upload(decode_image(edited(data, "flip"), 10**7), None)
    near = {h.image_id for h in done.near_duplicates}
    assert original in near and links_of(engine, model, done.image_id) == near
    assert check_groups(engine, model) == [sorted({done.image_id, *near})]
    with session_scope(engine) as s:
        assert links_table.state(s, model).links_seq == 0  # type: ignore[union-attr]  # not the tick's work

    class Failing(near_duplicates.UploadLinks):  # the links are written, then the transaction fails
        def store(self, session, image_id: int) -> None:  # type: ignore[no-untyped-def]
            super().store(session, image_id)
            raise RuntimeError("after the links")

    writer = BatchWriter(engine, embedder, LiveStage1(service.cache, service.stage1), 10**7, new_categories=False)
    copy = decode_image(edited(data, "resize"), 10**7)
    with pytest.raises(RuntimeError):
        writer.upload(
            copy, None, None, Failing(service.cache, engine, near_duplicates.LinkSearch.of(service.settings), refuse=False)
        )
    with session_scope(engine) as s:
        assert not catalogue.existing_by_sha(s, [copy.sha256])  # neither the image ...
    assert links_of(engine, model, original) == {done.image_id}  # ... nor its links
    assert check_groups(engine, model) == [sorted({done.image_id, *near})]


def test_a_running_server_links_what_populate_stored(engine: Engine, embedder, cifar_train: Dataset, tmp_path: Path) -> None:
    fill(engine, embedder, cifar_train.samples, 60)
    env = cli_env(engine, embedder, tmp_path, INDEX_REFRESH_SECONDS="0.3", NEAR_DUPLICATE_LINK_CHUNK="7", AUTH_MODE="off")
    with running_server(env) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        wait_until(lambda: http.get("/duplicates").json()["links_behind"] == 0, what="first links")
        folder = tmp_path / "copies"
        for sample in copies(engine, stored(engine, embedder.model_id), [5, 25, 44]).samples:
            (folder / sample.label).mkdir(parents=True, exist_ok=True)
            (folder / sample.label / f"{sample.source.replace(':', '_')}.png").write_bytes(sample.load())
        added = run_cli(env, "populate", "--dataset", "folder", "--source", str(folder), "--quiet")
        assert added.returncode == 0, added.stderr
        with session_scope(engine) as s:
            newest = s.scalar(text("SELECT max(seq) FROM embeddings"))
        wait_until(lambda: http.get("/duplicates").json()["as_of_seq"] >= newest, what="the server links populate's rows")
        page = http.get("/duplicates?limit=100").json()
        assert "near-duplicate links:" in server.log()  # linked by the tick, in chunks of 7
    vectors = stored(engine, embedder.model_id)
    got = sorted([i["image_id"] for i in g["images"]] for g in page["groups"])
    assert got == numpy_groups(vectors, page["threshold"]) == check_groups(engine, embedder.model_id)
    assert len(got) >= 3 and page["links_behind"] == 0 and page["total"] == len(got)


def test_the_backfill_resumes_after_kill_9(populated: Engine, embedder, tmp_path: Path) -> None:
    engine, model = populated, embedder.model_id
    env = cli_env(engine, embedder, tmp_path)
    killed = run_cli({**env, "IMSRC_FAILPOINT": "near_duplicates.chunk:3"}, "duplicates", "backfill", "--chunk", "20")
    assert killed.returncode == -9, killed.stderr  # SIGKILL in the third chunk's transaction
    assert killed.stdout.count("linked ") == 2  # two chunks committed, with their progress lines
    with session_scope(engine) as s:
        halfway = links_table.state(s, model)
    assert halfway is not None and halfway.links_seq > 0
    status = run_cli(env, "duplicates", "status")
    assert f"as of change {halfway.links_seq}: 28 images behind" in status.stdout, status.stdout  # 68 - 2 chunks of 20
    check_groups(engine, model)  # what was committed is consistent
    resumed = run_cli(env, "duplicates", "backfill", "--chunk", "20")
    assert resumed.returncode == 0, resumed.stderr
    assert "linked 20 images" in resumed.stdout and "done: 28 images linked" in resumed.stdout, resumed.stdout
    assert check_groups(engine, model) == numpy_groups(stored(engine, model), 0.91)
    assert len(check_groups(engine, model)) >= 4


def test_duplicates_page_is_read_from_sql_within_a_statement_timeout(engine: Engine, embedder, tmp_path: Path) -> None:
    """30,000 stored vectors and 10,000 groups: under a 200 ms statement timeout, reading every vector fails,
    and a page of groups (first or last) is answered."""
    model, n = embedder.model_id, 30_000
    with session_scope(engine, bulk=True) as s:
        s.execute(
            text(
                "INSERT INTO images (sha256, data, size_bytes, width, height, format, label_given) "
                "SELECT lpad(to_hex(g), 64, '0'), '\\x00', 1, 1, 1, 'png', false FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
        s.execute(
            text(
                "INSERT INTO embeddings (image_id, model, dim, vector) "
                "SELECT id, :m, :d, decode(repeat('3c', :b), 'hex') FROM images"
            ),
            {"m": model, "d": embedder.dim, "b": embedder.dim * 4},
        )
        ids = list(s.scalars(text("SELECT id FROM images ORDER BY id LIMIT 20000")))
        links_table.ensure_state(s, model, 0.91)
        links_table.add_links(s, model, 0.91, [(ids[k], ids[k + 1], 0.95) for k in range(0, len(ids), 2)])
    short = make_engine(engine.url, timeout_s=0.2)
    with pytest.raises(Exception, match=r"statement timeout|no answer within"), session_scope(short) as s:
        vector_reader.load_vectors(s, model)  # what GET /duplicates did before: every vector (psycopg's COPY)
    pages = Services.around(SearchService(make_settings(tmp_path, short), short, embedder)).catalogue
    first, last = pages.duplicates_page(None, 0, 20), pages.duplicates_page(None, 9_990, 20)
    assert first.total == 10_000 and len(first.groups) == 20 and len(last.groups) == 10
    assert first.links_behind == near_duplicates.BEHIND_CAP and first.as_of_seq == 0  # nothing linked by a tick yet
    pairs = [[ids[k], ids[k + 1]] for k in range(0, len(ids), 2)]
    assert all([i.image_id for i in g.images] in pairs for g in first.groups + last.groups)
    assert first.groups[0].category is None  # no category
    short.dispose()


def test_racing_uploads_keep_groups_consistent_and_the_tick_adds_what_they_missed(
    engine: Engine, embedder, cifar_train: Dataset, tmp_path: Path
) -> None:
    """Six edited copies of two stored images uploaded at once: each upload searched an index without the
    others, so the copies' links to each other are missing until the tick links them; groups stay the links'
    components throughout and end as NumPy's."""
    fill(engine, embedder, cifar_train.samples, 60)
    service = SearchService(make_settings(tmp_path, engine), engine, embedder)
    service.cache.get()
    while Services.around(service).lifecycle.link_duplicates().linked:  # the stored catalogue first
        pass
    vectors = stored(engine, service.model)
    originals = [int(vectors.ids[9]), int(vectors.ids[40])]
    with session_scope(engine) as s:
        data = catalogue.image_data(s, originals)
    uploads = [decode_image(edited(data[o], e), 10**7) for o in originals for e in EDITS]
    barrier = threading.Barrier(len(uploads))

    def upload(image):  # type: ignore[no-untyped-def]
        barrier.wait()
        return service.upload(image, None).image_id

    with ThreadPoolExecutor(len(uploads)) as pool:
        ids = list(pool.map(upload, uploads))
    assert len(set(ids)) == len(uploads)
    check_groups(engine, service.model)
    while Services.around(service).lifecycle.link_duplicates().linked:
        pass
    groups = check_groups(engine, service.model)
    assert groups == numpy_groups(stored(engine, service.model), service.settings.near_duplicate_threshold)
    for o in originals:
        assert any(o in g and len(set(g) & set(ids)) >= 2 for g in groups)
