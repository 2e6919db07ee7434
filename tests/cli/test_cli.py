"""The CLI as a user runs it: real processes, a real database, one clear error line on bad input."""

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from backend.core.config import PROJECT_ROOT
from backend.storage import migrate
from backend.storage.engine import session_scope
from backend.storage.schema import Image
from tests.utils.cli import run_cli
from tests.utils.http_images import serving
from tests.utils.settings import CIFAR_SUBSET

run = run_cli


@pytest.fixture
def env(databases, tmp_path: Path) -> dict[str, str]:
    name = f"imsrc_cli_{os.getpid()}_{tmp_path.name[-12:]}".replace("-", "_").lower()
    from sqlalchemy import text

    with databases.admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    databases.created.append(name)
    url = databases.server_url.set(database=name).render_as_string(hide_password=False)
    return {"DATABASE_URL": url, "DATA_DIR": str(tmp_path / "data"), "CIFAR10_DIR": str(CIFAR_SUBSET)}


def image_count(url: str) -> int:
    from sqlalchemy.engine import make_url

    from backend.storage.engine import make_engine

    engine: Engine = make_engine(make_url(url).set(drivername="postgresql+psycopg2"))
    with session_scope(engine) as s:
        n = s.scalar(select(func.count()).select_from(Image)) or 0
    engine.dispose()
    return n


def test_end_to_end_populate_index_search(env: dict[str, str], tmp_path: Path, cifar_queries) -> None:
    assert "run init-db first" in run(env, "populate", "--num-images", "10").stderr
    r = run(env, "init-db")
    assert r.returncode == 0 and f"schema revision {migrate.head_revision()}" in r.stdout
    r = run(env, "populate", "--dataset", "cifar10", "--split", "train", "--num-images", "60", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "60 images added" in r.stdout
    r = run(env, "populate", "--dataset", "cifar10", "--split", "train", "--num-images", "60", "--quiet")
    assert "0 images added, 60 already stored" in r.stdout  # rerun resumes, stores nothing twice
    r = run(env, "build-index")
    assert "60 vectors in 10 categories" in r.stdout
    assert "stage 1: prototype (STAGE1=auto; too few given labels" in r.stdout  # 6 a category: nothing trained

    queries = []
    for i, s in enumerate(cifar_queries.samples[:3]):
        queries.append(tmp_path / f"q{i}.png")
        queries[-1].write_bytes(s.load())
    r = run(env, "search", *map(str, queries), "--limit", "4", "--top-categories", "2", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["query"] for line in lines] == list(map(str, queries))
    for line in lines:
        assert len(line["results"]) == 4 and len(line["searched_categories"]) == 2
        assert {h["category"] for h in line["results"]} <= set(line["searched_categories"])
        assert set(line["results"][0]) >= {"image_id", "category", "score"} and "timings_ms" in line
    exact = json.loads(run(env, "search", str(queries[0]), "--no-prototypes", "--json").stdout)
    assert exact["vectors_scanned"] == exact["vectors_total"] == 60
    # A URL, filters and a page: the same answer as the file with the same parameters.
    with serving({"/q0.png": queries[0].read_bytes()}) as site:
        args = ["--no-prototypes", "--category", "cat", "--category", "dog", "--offset", "2", "--limit", "3", "--json"]
        by_url = run({**env, "ALLOW_PRIVATE_URLS": "true"}, "search", f"{site}/q0.png", *args)
        assert by_url.returncode == 0, by_url.stderr
        refused = run(env, "search", f"{site}/q0.png")
        assert refused.returncode == 2 and "ALLOW_PRIVATE_URLS" in refused.stderr
    by_file = json.loads(run(env, "search", str(queries[0]), *args).stdout)
    assert json.loads(by_url.stdout)["results"] == by_file["results"]
    assert [h["rank"] for h in by_file["results"]] == [3, 4, 5] and by_file["vectors_scanned"] == 12
    assert {h["category"] for h in by_file["results"]} <= {"cat", "dog"}

    status = json.loads(run(env, "status", "--json").stdout)
    assert status["database"]["images"] == 60 and status["index"]["current"]


def test_fastscan_through_the_cli(env: dict[str, str], tmp_path: Path, cifar_queries) -> None:
    env = {**env, "FAISS_INDEX_TYPE": "fastscan", "FAISS_LIST_SIZE": "8"}
    assert run(env, "init-db").returncode == 0
    assert run(env, "populate", "--dataset", "cifar10", "--split", "train", "--num-images", "60", "--quiet").returncode == 0
    r = run(env, "build-index")
    assert "60 vectors in 10 categories" in r.stdout, r.stderr
    assert len(list((Path(env["DATA_DIR"]) / "index").glob("*.rerank"))) == 1  # the float16 copy, beside the index
    query = tmp_path / "q.png"
    query.write_bytes(cifar_queries.samples[0].load())
    line = json.loads(run(env, "search", str(query), "--limit", "4", "--top-categories", "2", "--json").stdout)
    assert len(line["results"]) == 4 and {h["category"] for h in line["results"]} <= set(line["searched_categories"])
    assert line["vectors_scanned"] < 60
    r = run(env, "status")
    assert "index     fastscan (FAISS_INDEX_TYPE=fastscan): 60 vectors, current (loaded from cache" in r.stdout, r.stdout
    assert "pq320x4 codec re-ranked from float16 file" in r.stdout


@pytest.mark.parametrize(
    ("extra_env", "args", "message"),
    [
        ({}, ["populate", "--dataset", "folder", "--source", "/does/not/exist"], "folder not found"),
        ({}, ["populate", "--dataset", "cifar10", "--source", "/does/not/exist"], "no CIFAR-10 batches"),
        ({"MODEL_NAME": "vgg16"}, ["status"], "MODEL_NAME"),
        ({"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing"}, ["init-db"], "database unreachable"),
        ({}, ["search", "setup.sh"], "not an image"),
        ({}, ["search", "/no/such.png"], "cannot read"),
        ({}, ["search", "setup.sh", "--limit", "0"], "--limit: 0 is not allowed"),
        ({}, ["search", "setup.sh", "--top-categories", "11"], "--top-categories: 11 is not allowed"),
        ({}, ["search", "setup.sh", "--limit", "many"], "not a whole number"),
        # Edges that ingested everything, were silently replaced, or ended in a traceback before (issue 12):
        ({}, ["populate", "--num-images", "-5"], "--num-images: -5 is not allowed"),
        ({}, ["populate", "--num-images", "5", "--batch-size", "0"], "--batch-size: 0 is not allowed"),
        ({}, ["serve", "--port", "70000"], "--port"),
        ({"DATA_DIR": "/sys/kernel"}, ["status"], "DATA_DIR /sys/kernel is not writable"),
        ({"DATA_DIR": str(PROJECT_ROOT / "setup.sh")}, ["status"], "is not a directory"),
        ({"DATABASE_URL": "postgres ql://nonsense"}, ["status"], "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://root@127.0.0.1/test"}, ["status"], "is not PostgreSQL"),
        ({"DB_TIMEOUT_SECONDS": "-1"}, ["status"], "DB_TIMEOUT_SECONDS"),
        ({"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing"}, ["serve"], "database unreachable"),
        # Access control (issue 9): no keyless server on an address others can reach; bad key commands.
        ({"AUTH_MODE": "off"}, ["serve", "--host", "0.0.0.0"], "AUTH_MODE=off is only allowed on a loopback address"),
        ({"AUTH_MODE": "off", "API_HOST": "192.0.2.7"}, ["serve"], "AUTH_MODE=off is only allowed on a loopback address"),
        ({"AUTH_MODE": "sometimes"}, ["status"], "AUTH_MODE"),
        ({"CORS_ORIGINS": "evil.example"}, ["status"], "is not an origin"),
        ({}, ["api-key", "create", "--name", "x", "--scope", "root"], "--scope: invalid choice"),
        ({}, ["api-key", "create", "--name", "\x01", "--scope", "write"], "key name"),
        ({}, ["api-key", "revoke", "nope"], "no live API key"),
        ({}, ["restore", "setup.sh", "--yes"], "not a pg_dump custom-format backup"),
        ({}, ["restore", "setup.sh"], "pass --yes"),
        ({}, ["backup", "/no/such/dir/file.dump"], "does not exist"),
        # Index types and codecs (issue 10): unknown names, a PQ size that does not divide the dimension.
        ({"FAISS_INDEX_TYPE": "annoy"}, ["status"], "FAISS_INDEX_TYPE"),
        ({"FAISS_INDEX_TYPE": "hnsw"}, ["status"], "use ivf"),
        ({"VECTOR_CODEC": "int4"}, ["status"], "VECTOR_CODEC"),
        ({"VECTOR_CODEC": "pq7"}, ["status"], "7 does not divide the vector dimension 1280"),
        ({"FAISS_NPROBE": "0"}, ["status"], "FAISS_NPROBE"),
        # fastscan and auto (issue 20): M must divide the dimension; fastscan has its own codes and re-rank copy.
        ({"FASTSCAN_M": "7"}, ["status"], "FASTSCAN_M=7: 7 does not divide the vector dimension 1280"),
        ({"FAISS_INDEX_TYPE": "fastscan", "VECTOR_CODEC": "sq8"}, ["status"], "unset VECTOR_CODEC and RERANK"),
        ({"FAISS_AUTO_THRESHOLD": "-1"}, ["status"], "FAISS_AUTO_THRESHOLD"),
        ({}, ["search", "setup.sh", "--nprobe", "0"], "--nprobe: 0 is not allowed"),
        # Filters and paging (issue 23): the API's bounds.
        ({}, ["search", "setup.sh", "--min-score", "1.5"], "--min-score: 1.5 is not allowed"),
        ({}, ["search", "setup.sh", "--min-score", "nan"], "--min-score: nan is not allowed"),
        ({}, ["search", "setup.sh", "--offset", "1001"], "--offset: 1001 is not allowed"),
        ({}, ["search", "setup.sh", "--category", " "], "category name must not be empty"),
        ({}, ["search", "ftp://example.com/a.png"], "cannot read"),
        ({}, ["search", "http://127.0.0.1:9/a.png"], "ALLOW_PRIVATE_URLS"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(env: dict[str, str], extra_env: dict, args: list[str], message: str) -> None:
    assert run(env, "init-db").returncode == 0
    r = run({**env, **extra_env}, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert image_count(env["DATABASE_URL"]) == 0


def test_folder_with_undecodable_names_ingests_and_reruns(env: dict[str, str], tmp_path: Path) -> None:
    from PIL import Image as PILImage
    from sqlalchemy.engine import make_url

    from backend.storage.engine import make_engine

    root = tmp_path / "photos"
    os.makedirs(os.fsencode(root / "caf") + b"\xe9")  # Latin-1 names, as old cameras and archives make them
    (root / "tea").mkdir()
    for i, (folder, name) in enumerate([(b"caf\xe9", b"\xff1.png"), (b"caf\xe9", b"two.png"), (b"tea", b"t\xe9.png")]):
        with open(os.fsencode(root) + b"/" + folder + b"/" + name, "wb") as f:
            PILImage.new("RGB", (16, 16), (40 * i, 90, 200)).save(f, format="PNG")
    assert run(env, "init-db").returncode == 0
    first = run(env, "populate", "--dataset", "folder", "--source", str(root), "--quiet")
    assert first.returncode == 0 and "3 images added" in first.stdout, first.stderr
    again = run(env, "populate", "--dataset", "folder", "--source", str(root), "--quiet")
    assert again.returncode == 0 and "0 images added, 3 already stored" in again.stdout, again.stderr
    engine = make_engine(make_url(env["DATABASE_URL"]))
    with session_scope(engine) as session:
        sources = sorted(session.scalars(select(Image.source)))
    engine.dispose()
    assert sources == ["caf\ufffd/two.png", "caf\ufffd/\ufffd1.png", "tea/t\ufffd.png"]  # relative, never server paths


def test_api_keys_created_listed_revoked_and_the_admin_key_file(env: dict[str, str], tmp_path: Path) -> None:
    from backend.services.keys import KEY_PATTERN

    assert run(env, "init-db").returncode == 0
    r = run(env, "api-key", "create", "--name", "ci", "--scope", "write", "--scope", "search", "--scope", "write")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    assert KEY_PATTERN.match(key)
    listing = run(env, "api-key", "list", "--json").stdout
    assert key not in listing and key.split("_", 2)[2] not in listing  # the secret is never shown again
    (row,) = json.loads(listing)
    assert row["name"] == "ci" and row["scopes"] == ["search", "write"] and row["revoked_at"] is None
    assert run(env, "api-key", "revoke", "ci").returncode == 0
    assert json.loads(run(env, "api-key", "list", "--json").stdout) == []
    (revoked,) = json.loads(run(env, "api-key", "list", "--all", "--json").stdout)
    assert revoked["revoked_at"] is not None

    # The one-command start's admin key: made once, mode 600, kept while valid, replaced once revoked.
    key_file = Path(env["DATA_DIR"]) / "admin.key"
    first = run(env, "api-key", "ensure-admin")
    assert first.returncode == 0 and "created an admin API key" in first.stdout, first.stderr
    assert key_file.stat().st_mode & 0o777 == 0o600
    admin_key = key_file.read_text().strip()
    assert KEY_PATTERN.match(admin_key) and admin_key not in first.stdout
    again = run(env, "api-key", "ensure-admin")
    assert "created an admin" not in again.stdout and key_file.read_text().strip() == admin_key
    assert run(env, "api-key", "revoke", admin_key.split("_")[1]).returncode == 0
    assert "created an admin" in run(env, "api-key", "ensure-admin").stdout
    assert key_file.read_text().strip() != admin_key
