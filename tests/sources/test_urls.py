"""URL lists and downloads against a real HTTP server on 127.0.0.1 serving real CIFAR-10 images: 404s,
non-images, oversized bodies and redirects; private addresses refused unless allowed, on every hop."""

import time
from collections.abc import Iterator

import pytest

from backend.core.errors import InvalidInput
from backend.sources import urls
from backend.sources.datasets import load_cifar10
from backend.sources.urls import FetchFailed, FetchLimits, UrlRefused, blocked, fetch, parse_url_list
from tests.utils.http_images import Reply, serving
from tests.utils.settings import CIFAR_SUBSET

ALLOW = FetchLimits(allow_private=True, timeout_s=5)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    image = load_cifar10(CIFAR_SUBSET, "test")[0].load()
    routes = {
        "/cat.png": image,
        "/page.html": b"<html>not an image</html>" * 10,
        "/huge.png": image + b"\0" * 200_000,
        "/lying.png": Reply(image, headers={"Content-Length": str(10**9)}),
        "/hop": Reply(status=302, headers={"Location": "/cat.png"}),
        "/loop": Reply(status=302, headers={"Location": "/loop"}),
        "/to-file": Reply(status=302, headers={"Location": "file:///etc/passwd"}),
        # A byte a second: of the body, or of header lines first (each read alone would be in time).
        "/trickle-body": Reply(image, trickle_s=1),
        "/trickle-headers": Reply(image, trickle_s=1, slow_headers=60),
    }
    with serving(routes) as url:
        yield url


def test_an_image_downloads_and_redirects_are_followed(server: str) -> None:
    data = fetch(f"{server}/cat.png", ALLOW)
    assert data.startswith(b"\x89PNG") and fetch(f"{server}/hop", ALLOW) == data


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/missing.png", "HTTP 404"),
        ("/page.html", "not an image"),
        ("/huge.png", "larger than"),
        ("/lying.png", "declared"),
        ("/loop", "more than 5 redirects"),
        ("/to-file", r"not an http\(s\) URL"),
    ],
)
def test_bad_urls_fail_with_one_reason(server: str, path: str, reason: str) -> None:
    with pytest.raises(FetchFailed, match=reason):
        fetch(f"{server}{path}", FetchLimits(allow_private=True, max_bytes=100_000, timeout_s=5))


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_peer_sending_a_byte_a_second_cannot_outlast_the_deadline(server: str, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="took longer than 2 s"):
        fetch(f"{server}{path}", FetchLimits(allow_private=True, timeout_s=2))
    assert time.monotonic() - started < 3


def test_private_addresses_are_refused_by_default(server: str) -> None:
    with pytest.raises(UrlRefused, match="private, loopback or reserved"):
        fetch(f"{server}/cat.png")
    with pytest.raises(UrlRefused):
        fetch("http://localhost/cat.png")


def test_every_redirect_is_checked_again(server: str, monkeypatch) -> None:
    checked: list[str] = []
    real = urls.resolve

    def spy(host: str, port: int, allow_private: bool) -> str:
        checked.append(f"{host}:{port}")
        return real(host, port, allow_private)

    monkeypatch.setattr(urls, "resolve", spy)
    fetch(f"{server}/hop", ALLOW)
    assert len(checked) == 2


@pytest.mark.parametrize(
    ("address", "is_blocked"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # cloud metadata
        ("100.64.0.1", True),  # carrier-grade NAT
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("240.0.0.1", True),
        ("::1", True),
        ("fe80::1%eth0", True),
        ("fd00::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
    ],
)
def test_blocked_addresses(address: str, is_blocked: bool) -> None:
    assert blocked(address) is is_blocked


def test_urls_are_shown_without_credentials() -> None:
    assert urls.shown("https://bob:pw@[::1]:8443/a/b.png?X-Amz-Signature=s#f") == "https://[::1]:8443/a/b.png"
    assert urls.shown("http://u:p@example.com/x.png") == "http://example.com/x.png"
    _, problems = parse_url_list("ftp://u:secret@example.com/x.png\n", 5)
    assert "secret" not in problems[0] and "ftp://example.com/x.png" in problems[0]


def test_url_lists_csv_and_plain() -> None:
    text = (
        "url,category,description\nhttp://a.example/1.png,cat,a grey cat, sitting\n\n"
        "# comment\nhttps://b.example/2.jpg\nftp://c/3.png\nnot a url\n"
    )
    items, problems = parse_url_list(text, 10)
    assert [(i.url, i.category, i.description) for i in items] == [
        ("http://a.example/1.png", "cat", "a grey cat, sitting"),
        ("https://b.example/2.jpg", None, None),
    ]
    assert len(problems) == 2 and "line 6" in problems[0]
    with pytest.raises(InvalidInput, match="more than 1 URLs"):
        parse_url_list(text, 1)
