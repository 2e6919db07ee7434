"""Catalogue images from URLs: a URL list's lines, and downloads that are bounded and SSRF-safe.

A download resolves the host itself and refuses it when any address is loopback, private, link-local,
multicast, reserved, unspecified or shared (carrier-grade NAT), unless `allow_private` (ALLOW_PRIVATE_URLS);
it then connects to that vetted address (no second lookup a DNS rebinding could change), and checks every
redirect the same way. Size (declared and counted) and redirects are capped, the first bytes must look like
an image, and one deadline covers the whole download (connect, headers, body, redirects): when it passes,
the socket is shut down, so a peer that sends a byte a second cannot keep a download alive.
"""

import csv
import http.client
import io
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from backend.core.errors import InvalidInput

_SHARED = ipaddress.ip_network("100.64.0.0/10")
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 1 << 16
# Magic numbers of the formats `imaging.decode_image` reads; anything else is refused before it is stored.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class FetchFailed(InvalidInput):
    """This URL gave no image; the message says why (one line, for a job's failure list)."""


class UrlRefused(FetchFailed):
    """The URL may not be fetched at all (scheme, or an address inside the network)."""


@dataclass(frozen=True)
class FetchLimits:
    timeout_s: float = 10.0  # for the whole download: connect, headers, body, redirects
    max_bytes: int = 10 * 2**20
    max_redirects: int = 5
    allow_private: bool = False


@dataclass(frozen=True)
class UrlItem:
    url: str
    category: str | None = None
    description: str | None = None


def parse_url_list(text: str, max_items: int) -> tuple[list[UrlItem], list[str]]:
    """Items of a CSV `url[,category[,description]]` or a plain list (one URL a line; blank lines and
    `#` comments skipped, a `url,...` header too), and a reason for each line that is not an http(s) URL."""
    items: list[UrlItem] = []
    problems: list[str] = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        url = row[0].strip()
        if number == 1 and url.lower() == "url":
            continue
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            problems.append(f"line {number}: not an http(s) URL: {shown(url)[:200]!r}")
            continue
        if len(items) == max_items:
            raise InvalidInput(f"the list has more than {max_items:,} URLs")
        category = row[1].strip() if len(row) > 1 and row[1].strip() else None
        description = ",".join(row[2:]).strip() if len(row) > 2 else None
        items.append(UrlItem(url, category, description or None))
    return items, problems


def shown(url: str) -> str:
    """A URL as it may be stored, listed and logged: no user name or password, no query or fragment (signed
    URLs carry their credentials there); the download itself uses the URL as given."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"[:2000] if parts.scheme else url.split("@")[-1][:200]


def blocked(address: str) -> bool:
    """True for addresses a server must not be made to reach on a user's behalf."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED)
    )


def resolve(host: str, port: int, allow_private: bool) -> str:
    """One address to connect to for `host`; UrlRefused when any of its addresses is blocked."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchFailed(f"host {host!r} not found ({exc})") from None
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private and any(blocked(a) for a in addresses):
        raise UrlRefused(f"host {host!r} is a private, loopback or reserved address (set ALLOW_PRIVATE_URLS=true to allow)")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address vetted beforehand, whatever the host name resolves to now, under a deadline."""

    def __init__(self, host: str, port: int, address: str, timeout: float, deadline: "_Deadline") -> None:
        super().__init__(host, port, timeout=timeout)
        self.address, self.deadline = address, deadline

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)
        self.deadline.watch(self.sock)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, deadline: "_Deadline") -> None:
        super().__init__(host, port, timeout=timeout)
        self.address, self.deadline = address, deadline

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.deadline.watch(sock)  # the TLS handshake is under the deadline too
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]  # certificate of the host
        self.deadline.watch(self.sock)


class _Deadline:
    """Shuts the current connection's socket down when the download's time is up: a blocked connect or
    read then returns at once, however slowly the peer sends (per-read timeouts never fire on a trickle)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.expired = seconds, False
        self._end = time.monotonic() + seconds
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def left(self) -> float:
        return max(0.001, self._end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                raise FetchFailed(f"took longer than {self.seconds:g} s")

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed already

    def check(self) -> None:
        if self.expired:
            raise FetchFailed(f"took longer than {self.seconds:g} s")


def fetch(url: str, limits: FetchLimits = FetchLimits()) -> bytes:
    """The bytes at `url`, or FetchFailed / UrlRefused saying why not, within `limits.timeout_s` in all."""
    with _Deadline(limits.timeout_s) as deadline:
        for _ in range(limits.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UrlRefused(f"not an http(s) URL: {shown(url)[:200]!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = resolve(parts.hostname, port, limits.allow_private)
            pinned = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
            connection = pinned(parts.hostname, port, address, deadline.left(), deadline)
            try:
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                connection.request("GET", target, headers={"User-Agent": "imsrc/1", "Accept": "image/*"})
                response = connection.getresponse()
                if response.status in _REDIRECTS and response.getheader("Location"):
                    url = urljoin(url, response.getheader("Location", ""))
                    continue
                if response.status != 200:
                    raise FetchFailed(f"HTTP {response.status} {response.reason}")
                return _read(response, limits, deadline)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                deadline.check()  # a socket shut down by the deadline reads as a broken download
                raise FetchFailed(f"download failed: {exc or type(exc).__name__}") from None
            finally:
                connection.close()
        raise FetchFailed(f"more than {limits.max_redirects} redirects")


def _read(response: http.client.HTTPResponse, limits: FetchLimits, deadline: _Deadline) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise FetchFailed(f"larger than {limits.max_bytes:,} bytes ({int(declared):,} declared)")
    body = bytearray()
    while chunk := response.read(_CHUNK):
        body += chunk
        if len(body) > limits.max_bytes:
            raise FetchFailed(f"larger than {limits.max_bytes:,} bytes")
        deadline.check()
        if len(body) >= 16 and len(body) - len(chunk) < 16 and not looks_like_image(bytes(body[:16])):
            raise FetchFailed(f"not an image (content type {response.getheader('Content-Type') or 'unknown'})")
    deadline.check()  # a body cut short by the deadline is not an image
    if not looks_like_image(bytes(body[:16])):
        raise FetchFailed(f"not an image (content type {response.getheader('Content-Type') or 'unknown'})")
    return bytes(body)


def looks_like_image(head: bytes) -> bool:
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
