"""An image in the catalogue finds itself first (backend/search/own_image.py), even when stage 1 ranks its category
wrong: searched with C=1, by its own bytes and by a resized copy, on the real CIFAR-10 catalogue."""

import io

import pytest
from PIL import Image as PILImage
from sqlalchemy import Engine, select

from backend.core.search_params import SearchParams
from backend.imaging import decode_image
from backend.services.search import SearchService
from backend.storage.engine import session_scope
from backend.storage.schema import Image
from tests.index.test_stage1 import copy_catalogue
from tests.utils.settings import make_settings

CASES = 25  # stored images whose own category stage 1 does not rank first


@pytest.fixture(scope="module")
def service(catalogue_engine: Engine, databases, embedder, tmp_path_factory) -> SearchService:
    engine = databases.new()
    copy_catalogue(catalogue_engine, engine, embedder.model_id)
    svc = SearchService(make_settings(tmp_path_factory.mktemp("data"), engine, stage1="prototype"), engine, embedder)
    svc.stage1.retrain()  # sub-centroids for the near-copy probe; ranking stays by prototype
    return svc


@pytest.fixture(scope="module")
def misranked(service: SearchService) -> list[tuple[int, bytes, str]]:
    """(id, bytes, category) of stored images whose top-1 category by stage 1 is not their own."""
    with session_scope(service.engine) as session:
        rows = session.execute(select(Image.id, Image.data, Image.category_id).order_by(Image.id)).all()
    names = {r[2]: service._name(r[2]) for r in rows}
    images = [decode_image(bytes(r[1]), 10**7).rgb for r in rows]
    ranking, _ = service.stage1_ranking(images)
    wrong = [
        (int(r[0]), bytes(r[1]), names[r[2]] or "")
        for r, rank in zip(rows, ranking, strict=True)
        if rank[0].category != names[r[2]]
    ]
    assert len(wrong) >= CASES  # stage 1 is wrong often enough on this catalogue to test with
    return wrong[:CASES]


def check(
    service: SearchService, cases: list[tuple[int, bytes, str]], images: list[PILImage.Image], shas: list[str] | None, exact: bool
) -> None:
    results = service.search(images, SearchParams(limit=10, top_categories=1, use_prototypes=True), shas)
    missed = []
    for (image_id, _, category), result in zip(cases, results, strict=True):
        assert result.searched_categories != [category] or not exact  # stage 1 put another category first
        if result.results[0].image_id != image_id:
            missed.append(image_id)
        assert {h.category for h in result.results[1:]} <= set(result.searched_categories)  # nothing else changes
        assert len(result.results) == 10
    # Stored bytes: always. Near copies: measured 25/25 (2x) and 24/25 (0.75x) of these 32-pixel images; one
    # miss is allowed (the goal of 99 % is not met for downscaled copies of tiny images, see README).
    assert len(missed) <= (0 if exact else 1), f"{len(missed)} of {len(cases)} not first: {missed}"


def test_own_bytes_find_themselves_first(service: SearchService, misranked) -> None:
    images = [decode_image(data, 10**7) for _, data, _ in misranked]
    check(service, misranked, [i.rgb for i in images], [i.sha256 for i in images], exact=True)


@pytest.mark.parametrize("scale", [2.0, 0.75])
def test_resized_copies_find_their_original_first(service: SearchService, misranked, scale: float) -> None:
    copies = []
    for _, data, _ in misranked:
        image = decode_image(data, 10**7).rgb
        size = (round(image.width * scale), round(image.height * scale))
        out = io.BytesIO()
        image.resize(size, PILImage.Resampling.BICUBIC).save(out, "JPEG", quality=90)  # resized and re-encoded
        copies.append(decode_image(out.getvalue(), 10**7))
    assert all(c.sha256 != s for c, s in zip(copies, [decode_image(d, 10**7).sha256 for _, d, _ in misranked], strict=True))
    check(service, misranked, [c.rgb for c in copies], [c.sha256 for c in copies], exact=False)


def test_other_queries_stay_in_the_searched_categories(service: SearchService, cifar_queries) -> None:
    """Test-split images are not stored: their results come from the searched category only."""
    images = [decode_image(s.load(), 10**7) for s in cifar_queries.samples[:50]]
    params = SearchParams(limit=10, top_categories=1, use_prototypes=True)
    for result in service.search([i.rgb for i in images], params, [i.sha256 for i in images]):
        assert {h.category for h in result.results} == set(result.searched_categories)


def test_a_category_filter_keeps_the_own_image_out_when_it_names_other_categories(service: SearchService, misranked) -> None:
    """Searched by its own bytes with `categories` naming others only, a stored image is not shown: every
    result lies in the named categories."""
    (image_id, data, category), *_ = misranked
    others = sorted({c for _, _, c in misranked if c != category})[:2]
    image = decode_image(data, 10**7)
    params = SearchParams(limit=10, top_categories=1, use_prototypes=True, categories=others)
    (result,) = service.search([image.rgb], params, [image.sha256])
    assert image_id not in {h.image_id for h in result.results}
    assert result.results and {h.category for h in result.results} <= set(others)
    named = SearchParams(limit=10, top_categories=1, use_prototypes=True, categories=[category, *others])
    (result,) = service.search([image.rgb], named, [image.sha256])
    assert result.results[0].image_id == image_id  # its own category named: first again
