"""The web page in a real browser (Debian's chromium driven by Playwright) against a real server process."""

import os
from pathlib import Path

import pytest

from backend.core.config import PROJECT_ROOT
from backend.datasets import Dataset, balanced
from backend.ingest import ingest
from tests.utils.server import running_server

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no browser at {CHROMIUM}")


@pytest.fixture(scope="module")
def server(databases, embedder, cifar_train: Dataset, tmp_path_factory) -> str:
    engine = databases.new()
    ingest(Dataset("cifar10", balanced(cifar_train.samples, 100)), embedder, engine, 10**7, progress=False)
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DATA_DIR": str(tmp_path_factory.mktemp("browser-data")),
    }
    with running_server(env) as server:
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
    assert "100 images" in page.inner_text("[data-testid=status-line]")

    page.set_input_files("[data-testid=query-file]", str(query))
    page.fill("[data-testid=limit]", "8")
    page.fill("[data-testid=top-categories]", "2")
    page.click("[data-testid=search-btn]")
    page.wait_for_selector("[data-testid=result]")
    cards = page.query_selector_all("[data-testid=result]")
    assert len(cards) == 8
    assert "cos 0." in cards[0].inner_text()
    assert cards[0].query_selector("img").evaluate("img => img.complete && img.naturalWidth > 0")
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


def test_upload_form_and_visible_errors(page, cifar_queries: Dataset, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text")
    page.set_input_files("[data-testid=upload-file]", str(bad))
    page.click("#upload-form button")
    page.wait_for_selector("[data-testid=error]:not([hidden])")
    assert "not an image" in page.inner_text("[data-testid=error]")

    good = tmp_path / "bird.png"
    good.write_bytes(next(s for s in cifar_queries.samples if s.label == "bird").load())
    page.set_input_files("[data-testid=upload-file]", str(good))
    page.select_option("[data-testid=upload-category]", "bird")
    page.click("#upload-form button")
    page.wait_for_function("document.querySelector('[data-testid=upload-result]').textContent.includes('Stored as image')")
    assert "in bird" in page.inner_text("[data-testid=upload-result]")
    page.wait_for_function("document.querySelector('[data-testid=status-line]').textContent.includes('101 images')")

    page.click("[data-testid=category-chip] >> nth=2")
    page.wait_for_selector("[data-testid=browse] [data-testid=result]")
    assert len(page.query_selector_all("[data-testid=browse] [data-testid=result]")) >= 10
