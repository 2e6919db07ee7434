"""What a hostile client tried against a real server process (issue 19): an anonymous upload refused before
its body is read, a rebinding Host refused, forged log lines, server details shown to anonymous readers."""

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backend.services.keys import create_key
from backend.storage.engine import session_scope
from tests.utils.server import RunningServer, running_server

pytestmark = pytest.mark.model  # the servers load the real weights


def tree_bytes(*folders: Path) -> int:
    return sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def keyed(databases, tmp_path_factory) -> Iterator[tuple[RunningServer, Path, str]]:
    """A server with AUTH_MODE=writes (the default), its DATA_DIR and TMPDIR in one folder, and an admin key."""
    engine = databases.new()
    with session_scope(engine) as session:
        _info, admin = create_key(session, "admin", ["admin"])
    root = tmp_path_factory.mktemp("hostile")
    (root / "tmp").mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(root / "data"),
        "ONNX_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "onnx-hostile"),
        "TMPDIR": str(root / "tmp"),  # where Starlette would spool an upload
        "SERVE_WORKER": "false",
    }
    with running_server(env) as server:
        yield server, root, admin


def written_bytes(pid: int) -> int:
    """Bytes the process has written with write() and its kin, to files, pipes and sockets alike."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


def post_archive_head(url: str, declared: int, sent: int) -> int:
    """Start a multipart archive upload declaring `declared` bytes, send only `sent` of them, then wait for
    the answer: only a server that decides before reading the body can give one."""
    host, port = url.removeprefix("http://").split(":")
    part = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'
    sock = socket.create_connection((host, int(port)), timeout=20)
    head = ["POST /jobs/archive HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(part) + declared}"]
    head.append("Content-Type: multipart/form-data; boundary=b0undary")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + part)
    for _ in range(sent // 2**20):
        sock.sendall(b"\0" * 2**20)
    try:
        answer = sock.recv(4096)
    except TimeoutError:
        raise AssertionError("no answer within 20 s: the server waits for the rest of the body") from None
    finally:
        sock.close()
    return int(answer.split(b" ", 2)[1])


def test_an_anonymous_archive_is_refused_before_its_body_is_read(keyed) -> None:
    server, root, _admin = keyed
    before, written = tree_bytes(root), written_bytes(server.process.pid)
    assert post_archive_head(server.url, declared=200 * 2**20, sent=20 * 2**20) == 401
    assert written_bytes(server.process.pid) - written < 5 * 2**20, "the refused body was written out"
    assert tree_bytes(root) - before < 5 * 2**20


def test_the_wrong_scope_is_refused_before_the_body_too(keyed, databases) -> None:
    server, _root, admin = keyed
    answer = httpx.post(f"{server.url}/jobs/folder", headers={"X-API-Key": "not-a-key"}, json={"path": "/"}, timeout=30)
    assert answer.status_code == 401 and answer.json()["detail"] == "invalid or revoked API key"
    answer = httpx.post(f"{server.url}/categories", headers={"Authorization": f"Bearer {admin}"}, json={"name": "ok"})
    assert answer.status_code == 201, answer.text  # a good key still gets through, once checked
    time.sleep(0.5)
    logged = [line for line in server.log().splitlines() if "POST /categories 201" in line]
    assert len(logged) == 1 and f" key={admin.split('_')[1]}" in logged[0], logged  # the access line names the key's prefix


def test_anonymous_readers_see_no_server_paths(keyed) -> None:
    server, root, admin = keyed
    anonymous = httpx.get(f"{server.url}/status", timeout=30).json()
    assert str(root) not in anonymous["database"]["server"] and anonymous["database"]["server"] == "PostgreSQL server"
    shown = httpx.get(f"{server.url}/status", headers={"X-API-Key": admin}, timeout=30).json()
    assert shown["database"]["server"].startswith("postgresql") and "imsrc_test_" in shown["database"]["server"]


@pytest.fixture(scope="module")
def open_server(databases, tmp_path_factory) -> Iterator[RunningServer]:
    """AUTH_MODE=off on loopback: where a DNS-rebinding page would have changed the catalogue."""
    engine = databases.new()
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path_factory.mktemp("open")),
        "ONNX_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "onnx-hostile"),
        "AUTH_MODE": "off",
        "SERVE_WORKER": "false",
        "LOG_FORMAT": "text",
    }
    with running_server(env) as server:
        yield server


def test_a_rebinding_host_is_refused(open_server: RunningServer) -> None:
    forged = {"Host": "rebind.attacker.test:8104", "Origin": "http://rebind.attacker.test:8104"}
    answer = httpx.post(f"{open_server.url}/categories", headers=forged, json={"name": "rebound"}, timeout=30)
    assert answer.status_code == 400 and "host" in answer.text.lower()
    assert httpx.get(f"{open_server.url}/status", headers={"Host": "rebind.attacker.test"}, timeout=30).status_code == 400
    port = open_server.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", socket.gethostname()):
        assert httpx.get(f"{open_server.url}/health", headers={"Host": host}, timeout=30).status_code == 200, host
    names = httpx.get(f"{open_server.url}/categories", timeout=30).json()
    assert "rebound" not in str(names)


def test_a_path_cannot_forge_log_lines(open_server: RunningServer) -> None:
    forged = "/x%0A2026-11-29 12:00:00,000 INFO imsrc.access: FORGED POST /admin/rebuild-index 200%00%1B[31m"
    assert httpx.get(f"{open_server.url}{forged}", timeout=30).status_code == 404
    time.sleep(0.5)
    lines = [line for line in open_server.log().splitlines() if "FORGED" in line]
    assert len(lines) == 1, lines
    assert "imsrc.access: " in lines[0] and "\\n2026" in lines[0] and "\\x00" in lines[0] and "\\x1b" in lines[0]
    assert "\x00" not in open_server.log() and "\x1b" not in open_server.log()
