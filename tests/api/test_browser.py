"""The web page in a real browser (Debian's chromium driven by Playwright) against a real server process."""

import io
import os
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from backend.core.config import PROJECT_ROOT
from backend.services.keys import create_key
from backend.sources.datasets import Dataset
from backend.storage.engine import session_scope
from tests.utils.catalogue import fill
from tests.utils.http_images import Reply, serving
from tests.utils.server import running_server

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no browser at {CHROMIUM}")


@pytest.fixture(scope="module")
def browser_db(databases, embedder, cifar_train: Dataset) -> Engine:
    engine = databases.new()
    fill(engine, embedder, cifar_train.samples, 100)
    return engine


@pytest.fixture(scope="module")
def write_key(browser_db: Engine) -> str:
    with session_scope(browser_db) as session:
        return create_key(session, "browser", ["write"])[1]


def _env(engine: Engine, data_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": engine.url.render_as_string(hide_password=False), "DATA_DIR": str(data_dir), **extra}


@pytest.fixture(scope="module")
def server(browser_db: Engine, tmp_path_factory) -> str:
    """The default AUTH_MODE=writes: searching is public, uploading needs a key."""
    # Private addresses allowed: the URL search test serves its image from 127.0.0.1.
    with running_server(_env(browser_db, tmp_path_factory.mktemp("browser-data"), ALLOW_PRIVATE_URLS="true")) as server:
        yield server.url


@pytest.fixture(scope="module")
def page(server: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        pg = browser.new_page(viewport={"width": 1300, "height": 1000})
        pg.goto(f"{server}/")
        yield pg
        browser.close()


def test_search_shows_results_categories_and_timings(page, cifar_queries: Dataset, tmp_path: Path) -> None:
    sample = next(s for s in cifar_queries.samples if s.label == "automobile")
    query = tmp_path / "car.png"
    query.write_bytes(sample.load())
    page.wait_for_selector("[data-testid=category-chip]")  # categories loaded from the API
    page.wait_for_function("document.querySelector('[data-testid=status-line]').textContent.includes('100 images')")

    page.set_input_files("[data-testid=query-file]", str(query))
    page.fill("[data-testid=limit]", "8")
    page.fill("[data-testid=top-categories]", "2")
    page.click("[data-testid=search-btn]")
    page.wait_for_selector("[data-testid=result]")
    cards = page.query_selector_all("[data-testid=result]")
    assert len(cards) == 8
    assert "cos 0." in cards[0].inner_text()
    first_thumbnail = "document.querySelector('[data-testid=result] img')"
    page.wait_for_function(f"{first_thumbnail}.complete && {first_thumbnail}.naturalWidth > 0")  # lazy: may take a moment
    searched = page.query_selector_all("[data-testid=category].searched")
    assert len(searched) == 2 and len(page.query_selector_all("[data-testid=category]")) == 10
    result_cats = {c.inner_text().split("\n")[0] for c in cards}
    searched_names = {s.inner_text().split("\n")[0].replace(" ✓", "") for s in searched}
    assert result_cats <= searched_names
    # The nearest neighbours of a car should mostly be vehicles.
    vehicles = sum(c.inner_text().split("\n")[0] in {"automobile", "truck", "ship", "airplane"} for c in cards)
    assert vehicles >= 6
    assert "search" in page.inner_text("[data-testid=timings]")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)

    # Exact mode and "prototypes only".
    page.uncheck("[data-testid=use-prototypes]")
    page.click("[data-testid=search-btn]")
    page.wait_for_function("document.getElementById('results-title').textContent.includes('exact')")
    page.click("[data-testid=prototypes-btn]")
    page.wait_for_function("document.getElementById('results-title').textContent.includes('prototypes only')")


def test_upload_asks_for_a_key_and_shows_errors(page, write_key: str, cifar_queries: Dataset, tmp_path: Path) -> None:
    good = tmp_path / "bird.png"
    good.write_bytes(next(s for s in cifar_queries.samples if s.label == "bird").load())
    page.set_input_files("[data-testid=upload-file]", str(good))
    page.select_option("[data-testid=upload-category]", "bird")
    page.click("#upload-form button")
    # A write needs a key: the page asks for one, then sends the upload again with it.
    page.wait_for_selector("[data-testid=key-panel]:not([hidden])")
    assert "'write' scope" in page.inner_text("[data-testid=key-reason]")
    page.fill("[data-testid=key-input]", "imsrc_00000000_" + "x" * 43)  # a wrong key is refused, and forgotten
    page.click("[data-testid=key-submit]")
    page.wait_for_selector("[data-testid=error]:not([hidden])")
    assert "invalid or revoked API key" in page.inner_text("[data-testid=error]")
    assert page.evaluate("sessionStorage.getItem('imsrc-api-key')") is None
    page.click("#upload-form button")
    page.wait_for_selector("[data-testid=key-panel]:not([hidden])")
    page.fill("[data-testid=key-input]", write_key)
    page.click("[data-testid=key-submit]")
    page.wait_for_function("document.querySelector('[data-testid=upload-result]').textContent.includes('Stored as image')")
    assert page.is_visible("[data-testid=key-state]")
    assert page.evaluate("sessionStorage.getItem('imsrc-api-key')") == write_key  # kept for this tab only
    assert "in bird" in page.inner_text("[data-testid=upload-result]")
    page.wait_for_function("document.querySelector('[data-testid=status-line]').textContent.includes('101 images')")

    # With the key kept, a bad file gets the server's own error, at once.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text")
    page.set_input_files("[data-testid=upload-file]", str(bad))
    page.click("#upload-form button")
    page.wait_for_function("document.querySelector('[data-testid=error]').textContent.includes('not an image')")
    assert page.is_hidden("[data-testid=key-panel]")

    page.click("[data-testid=category-chip] >> nth=2")
    page.wait_for_selector("[data-testid=browse] [data-testid=result]")
    assert len(page.query_selector_all("[data-testid=browse] [data-testid=result]")) >= 10


def test_a_zip_from_the_page_reaches_100_percent_and_is_searchable(
    page, write_key: str, cifar_queries: Dataset, tmp_path: Path
) -> None:
    import zipfile

    chosen = cifar_queries.samples[-30:]  # not the bird the upload test stored
    archive = tmp_path / "catalogue.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, sample in enumerate(chosen):
            zf.writestr(f"{sample.label}/q{i}.png", sample.load())
        zf.writestr("../outside.png", chosen[0].load())  # skipped and counted, never written
    page.set_input_files("[data-testid=archive-file]", str(archive))
    page.click("#archive-form button")
    if page.is_visible("[data-testid=key-panel]"):
        page.fill("[data-testid=key-input]", write_key)
        page.click("[data-testid=key-submit]")
    page.wait_for_function(
        "[...document.querySelectorAll('.job')].some(j => j.textContent.includes('archive · succeeded · 100 %'))", timeout=180_000
    )
    card = page.inner_text(".job.succeeded >> nth=0")
    assert "30 / 30 done: 30 added, 0 duplicates, 0 failed, 1 skipped" in card and "images/s" in card
    query = tmp_path / "query.png"
    query.write_bytes(chosen[5].load())
    page.set_input_files("[data-testid=query-file]", str(query))
    page.click("[data-testid=search-btn]")
    page.wait_for_selector("[data-testid=results] [data-testid=result]")
    assert "cos 1.000" in page.inner_text("[data-testid=results] [data-testid=result] >> nth=0")


def test_the_pictures_search_by_url_filters_paging_duplicates_and_delete(
    page, server: str, write_key: str, cifar_queries: Dataset, tmp_path: Path
) -> None:
    """A fresh tab: every new part of the page works, and nothing is logged to the console on the way
    (the favicon included) until the one 401 a delete without a key is meant to get."""
    pg = page.context.browser.new_page(viewport={"width": 1300, "height": 1000})
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.goto(f"{server}/")
    pg.wait_for_selector("[data-testid=status-category]")
    status = pg.inner_text("[data-testid=status]")
    assert "Model" in status and "efficientnet_lite0" in status and "{" not in status  # a panel, not JSON
    assert len(pg.query_selector_all("[data-testid=status-category]")) == 10
    pg.wait_for_function("document.querySelectorAll('[data-testid=gallery-row]').length === 10")
    assert len(pg.query_selector_all("[data-testid=gallery-row] >> nth=0 >> [data-testid=gallery-image]")) == 6
    pg.wait_for_function("Number(document.getElementById('map').dataset.points) >= 100")

    sample = next(s for s in cifar_queries.samples if s.label == "ship")
    with serving({"/ship.png": sample.load()}) as site:
        pg.fill("[data-testid=query-url]", f"{site}/ship.png")
        pg.fill("[data-testid=limit]", "5")
        pg.click("[data-testid=search-btn]")
        pg.wait_for_selector("[data-testid=results] [data-testid=result]")
        pg.wait_for_function("document.getElementById('map').dataset.query")  # the query placed on the map
        assert len(pg.query_selector_all("[data-testid=results] [data-testid=result]")) == 5
        bars = pg.query_selector_all("[data-testid=category]")
        assert len(bars) == 10 and len(pg.query_selector_all("[data-testid=category].searched")) == 3

        pg.click("[data-testid=page-next]")  # the next five: ranks 6 to 10
        pg.wait_for_function("document.querySelector('[data-testid=results] .score')?.textContent.startsWith('#6 ')")
        pg.click("[data-testid=filter-box] summary")
        pg.check("[data-testid=filter-category][value=cat]")
        pg.click("[data-testid=search-btn]")
        pg.wait_for_function("document.getElementById('results-title').textContent.includes('only cat')")
        cats = {c.inner_text().split("\n")[0] for c in pg.query_selector_all("[data-testid=results] [data-testid=result]")}
        assert cats == {"cat"}
        pg.fill("[data-testid=min-score]", "0.99")
        pg.click("[data-testid=search-btn]")
        pg.wait_for_function("document.getElementById('results').textContent.includes('No images found')")
        pg.fill("[data-testid=min-score]", "")
        pg.uncheck("[data-testid=filter-category][value=cat]")
        pg.click("[data-testid=search-btn]")
        pg.wait_for_selector("[data-testid=results] [data-testid=result]")

    # More like this: a click on a result searches with it.
    first = pg.get_attribute("[data-testid=results] [data-testid=result] >> nth=0", "data-image-id")
    pg.click("[data-testid=results] [data-testid=result] >> nth=0 >> img")
    pg.wait_for_function(f"document.getElementById('results-title').textContent.includes('Similar to image {first}')")

    # A near-duplicate (a mirrored copy of a stored image) shows up in the duplicates view.
    from PIL import Image, ImageOps

    original = Image.open(io.BytesIO(httpx.get(f"{server}/images/{first}").content)).convert("RGB")
    copy = io.BytesIO()
    ImageOps.mirror(original).save(copy, "PNG")
    info = httpx.get(f"{server}/images/{first}/info").json()
    stored = httpx.post(
        f"{server}/upload",
        files={"file": ("m.png", copy.getvalue())},
        data={"category": info["category"]},
        headers={"X-API-Key": write_key},
    ).json()
    assert int(first) in [h["image_id"] for h in stored["near_duplicates"]]
    pg.click("[data-testid=duplicates-btn]")
    group = f"[data-testid=dup-group]:has([data-image-id='{stored['image_id']}'])"
    pg.wait_for_selector(group)
    assert pg.query_selector(f"{group} [data-image-id='{first}']") is not None
    assert problems == [], problems

    # Delete the copy from the page: more like the original shows it; deleting asks for the key (the one
    # 401), then deletes.
    pg.click(f"{group} [data-image-id='{first}']")
    pg.wait_for_selector(f"[data-testid=results] [data-image-id='{stored['image_id']}']")
    pg.once("dialog", lambda d: d.accept())
    pg.click(f"[data-testid=results] [data-image-id='{stored['image_id']}'] [data-testid=delete]")
    pg.wait_for_selector("[data-testid=key-panel]:not([hidden])")
    pg.fill("[data-testid=key-input]", write_key)
    pg.click("[data-testid=key-submit]")
    pg.wait_for_function(f"!document.querySelector(\"[data-image-id='{stored['image_id']}']\")")
    assert httpx.get(f"{server}/images/{stored['image_id']}").status_code == 404
    assert len(problems) == 1 and "401" in problems[0], problems
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "page-pictures.png"), full_page=True)
    pg.close()


ATTACK_PAGE = """<!doctype html><html><body>
<form id="f" method="post" action="{target}/admin/rebuild-index"></form>
<script>
  // What a hostile site can make a visitor's browser send without any preflight: a form post, and a
  // no-cors fetch with a multipart body (a "simple" request the server executes even if the page
  // cannot read the answer).
  const png = Uint8Array.from(atob("{png}"), c => c.charCodeAt(0));
  const form = new FormData();
  form.append("file", new Blob([png], {{type: "image/png"}}), "x.png");
  form.append("category", "bird");
  fetch("{target}/upload", {{method: "POST", mode: "no-cors", body: form}})
    .then(() => fetch("{target}/categories", {{method: "POST", mode: "no-cors", body: '{{"name": "pwned"}}'}}))
    .finally(() => {{ document.title = "sent"; document.getElementById("f").submit(); }});
</script></body></html>"""


def test_a_cross_site_page_changes_nothing(page, browser_db: Engine, cifar_queries: Dataset, tmp_path: Path) -> None:
    """Even with AUTH_MODE=off, a page on another origin cannot make the visitor's browser change the catalogue."""
    import base64

    with running_server(_env(browser_db, tmp_path / "data", AUTH_MODE="off")) as target:
        before = httpx.get(f"{target.url}/status").json()
        png = base64.b64encode(next(s for s in cifar_queries.samples if s.label == "ship").load()).decode()
        evil = Reply(ATTACK_PAGE.format(target=target.url, png=png).encode(), headers={"Content-Type": "text/html"})
        with serving({"/evil.html": evil}) as site:
            pg = page.context.browser.new_page()  # the module's browser, a page of its own
            try:
                # Another origin: "localhost" is not "127.0.0.1" to a browser, and the port differs too.
                pg.goto(f"{site.replace('127.0.0.1', 'localhost')}/evil.html")
                pg.wait_for_url(f"{target.url}/admin/rebuild-index", timeout=30_000)  # the form post landed there
                assert "cross-site request refused" in pg.content()
            finally:
                pg.close()
        after = httpx.get(f"{target.url}/status").json()
        log = target.log()
    assert after["database"]["images"] == before["database"]["images"]
    assert after["index"]["refreshes"] == before["index"]["refreshes"]
    assert "pwned" not in [c["name"] for c in after["database"]["categories"]]
    assert log.count(" 403 ") >= 3  # upload, category and form post, each refused and logged
