"""/docs and /redoc render in a real browser (Debian's chromium) against a real server process, with every
request the pages make answered by that server: no CDN, no fonts, no validator, so they work offline."""

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.utils.server import running_server

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no browser at {CHROMIUM}")


@pytest.fixture(scope="module")
def server(databases, tmp_path_factory) -> Iterator[str]:
    """An empty catalogue is enough: the pages only read the OpenAPI schema."""
    engine = databases.new()
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path_factory.mktemp("docs-data")),
        "SERVE_WORKER": "false",
    }
    with running_server(env) as running:
        yield running.url


@pytest.fixture(scope="module")
def operations(server: str) -> int:
    return sum(len(ops) for ops in httpx.get(f"{server}/openapi.json").json()["paths"].values())


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield browser
        browser.close()


@dataclass
class Traffic:
    seen: list[str] = field(default_factory=list)  # every request the page sent
    left: list[str] = field(default_factory=list)  # sent to another machine (aborted here, listed)
    refused: list[str] = field(default_factory=list)  # never sent: the page's Content-Security-Policy refused it
    errors: list[str] = field(default_factory=list)  # script errors, failed requests, console errors


@pytest.fixture
def offline_page(browser):
    """A page whose requests are all recorded; any that would leave the machine is aborted and listed."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    traffic = Traffic()

    def route(r) -> None:  # type: ignore[no-untyped-def]
        url = r.request.url
        traffic.seen.append(url)
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname in LOCAL_HOSTS:
            r.continue_()
        else:
            traffic.left.append(url)
            r.abort()

    def failed(request) -> None:  # type: ignore[no-untyped-def]
        (traffic.refused if request.failure == "csp" else traffic.errors).append(request.url)

    page.route("**/*", route)
    page.on("requestfailed", failed)
    page.on("pageerror", lambda e: traffic.errors.append(str(e)))
    page.on("console", lambda m: traffic.errors.append(m.text) if m.type == "error" and "Security Policy" not in m.text else None)
    yield page, traffic
    page.close()


def test_swagger_ui_renders_every_operation_from_local_assets(offline_page, server: str, operations: int) -> None:
    page, traffic = offline_page
    response = page.goto(f"{server}/docs")
    page.wait_for_selector(".opblock-summary-path >> text=/search")
    paths = {p.inner_text().replace("\u200b", "") for p in page.query_selector_all(".opblock-summary-path")}
    assert {"/search", "/upload", "/jobs/archive", "/status"} <= paths
    assert len(page.query_selector_all(".opblock")) == operations > 20  # every operation in the schema
    page.wait_for_selector("button.authorize")  # the API key schemes are offered
    assert traffic.left == [] and traffic.refused == [] and traffic.errors == [], traffic
    assert f"{server}/docs-assets/swagger-ui-bundle.js" in traffic.seen and f"{server}/openapi.json" in traffic.seen
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_redoc_renders_every_operation_from_local_assets(offline_page, server: str, operations: int) -> None:
    page, traffic = offline_page
    page.goto(f"{server}/redoc")
    page.wait_for_selector("[data-section-id^='operation/']")
    assert len(page.query_selector_all("[data-section-id^='operation/']")) == operations > 20
    text = page.inner_text("body")
    assert "/search" in text and "Upload" in text
    assert traffic.left == [] and traffic.errors == [], traffic
    # ReDoc's menu always asks for its maker's logo from their CDN; the page's policy keeps it in the browser.
    assert set(traffic.refused) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}
    assert f"{server}/docs-assets/redoc.standalone.js" in traffic.seen
