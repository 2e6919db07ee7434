"""One real HTTP server on 127.0.0.1 for the tests' downloads and pages: given bytes by path (404 elsewhere),
or whatever a function answers, including redirects, lying lengths and peers that send a byte a second."""

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Reply:
    """One answer. Content-Length is the body's unless `headers` says otherwise (then no body is sent).
    With `trickle_s`, the body goes a byte at a time that far apart, after `slow_headers` extra header
    lines sent the same way: a peer that is never silent for long but never done."""

    body: bytes = b""
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    trickle_s: float = 0.0
    slow_headers: int = 0


Answer = bytes | Reply | None  # bytes: 200 with them; None: 404
Routes = Mapping[str, bytes | Reply] | Callable[[str], Answer]


def _reply(routes: Routes, path: str) -> Reply:
    answer = routes(path) if callable(routes) else routes.get(path)
    if answer is None:
        return Reply(b"missing", 404)
    return answer if isinstance(answer, Reply) else Reply(answer)


def _send(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
    if reply.slow_headers:
        handler.wfile.write(f"HTTP/1.1 {reply.status} OK\r\n".encode())
        for n in range(reply.slow_headers):
            handler.wfile.write(f"X-Slow-{n}: 1\r\n".encode())
            handler.wfile.flush()
            time.sleep(reply.trickle_s)
    handler.send_response(reply.status)
    headers = {"Content-Length": str(len(reply.body)), **reply.headers}
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    if headers["Content-Length"] != str(len(reply.body)):
        return
    if not reply.trickle_s:
        handler.wfile.write(reply.body)
        return
    for byte in reply.body:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(reply.trickle_s)


@contextmanager
def serving(routes: Routes) -> Iterator[str]:
    """Serve `routes` (path without its query -> bytes or Reply, or a function of the path); yields the base
    URL. A function runs in the request's own thread, so it may block (to hold a download) or count."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                _send(self, _reply(routes, urlsplit(self.path).path))
            except OSError:
                pass  # the client gave up (a deadline passed): what such tests want

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
