"""Search endpoints. Handlers are plain `def`: FastAPI runs them in its thread pool, so decoding,
downloading, embedding and FAISS work never block the event loop."""

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from backend.api.deps import ImageId, SearchDep, SettingsDep
from backend.api.errors import error_responses
from backend.api.query_images import FILE_HELP, URL_HELP, query_form, query_images
from backend.api.security import Access, guard
from backend.core import search_params as sp
from backend.core.search_params import SearchParams
from backend.schemas import CategoryScoreOut, PrototypeResponse, SearchBatchResponse, SearchResponse
from backend.sources.query_images import URL_MAX

router = APIRouter(tags=["search"])

Limit = Annotated[int | None, Query(ge=sp.LIMIT_MIN, le=sp.LIMIT_MAX, description=sp.LIMIT_HELP)]
TopCategories = Annotated[
    int | None, Query(ge=sp.TOP_CATEGORIES_MIN, le=sp.TOP_CATEGORIES_MAX, description=sp.TOP_CATEGORIES_HELP)
]
UsePrototypes = Annotated[bool | None, Query(description=sp.USE_PROTOTYPES_HELP)]
Nprobe = Annotated[int | None, Query(ge=sp.NPROBE_MIN, le=sp.NPROBE_MAX, description=sp.NPROBE_HELP)]
Offset = Annotated[int | None, Query(ge=sp.OFFSET_MIN, le=sp.OFFSET_MAX, description=sp.OFFSET_HELP)]
MinScore = Annotated[
    float | None, Query(ge=sp.MIN_SCORE_MIN, le=sp.MIN_SCORE_MAX, allow_inf_nan=False, description=sp.MIN_SCORE_HELP)
]
Categories = Annotated[list[str] | None, Query(max_length=sp.CATEGORIES_MAX, description=sp.CATEGORIES_HELP)]
Files = Annotated[list[UploadFile] | None, File(description=FILE_HELP)]
Url = Annotated[str | None, Form(max_length=URL_MAX, description=URL_HELP)]


def _params(
    settings: SettingsDep,
    limit: Limit = None,
    use_prototypes: UsePrototypes = None,
    top_categories: TopCategories = None,
    nprobe: Nprobe = None,
    offset: Offset = None,
    min_score: MinScore = None,
    categories: Categories = None,
) -> SearchParams:
    return SearchParams.resolve(settings, limit, top_categories, use_prototypes, nprobe, offset, min_score, categories)


Params = Annotated[SearchParams, Depends(_params)]


@router.post(
    "/search",
    response_model=SearchResponse | SearchBatchResponse,
    dependencies=[guard(Access.SEARCH), Depends(query_form(sp.QUERIES_MAX))],
    responses=error_responses(400, 413, 422),
)
def search(
    service: SearchDep, settings: SettingsDep, params: Params, file: Files = None, url: Url = None
) -> SearchResponse | SearchBatchResponse:
    """Images most similar to the uploaded one (or the one at `url`), with cosine scores and per-stage
    timings. Several files: `{"queries": [...]}`, one result set per file, in order (embedded together)."""
    images, sha256s = query_images(file, url, settings, service.image_size)
    results = [SearchResponse.of(r, params) for r in service.search(images, params, sha256s)]
    return results[0] if len(results) == 1 else SearchBatchResponse(queries=results)


@router.post(
    "/search/prototypes",
    response_model=PrototypeResponse,
    dependencies=[guard(Access.SEARCH), Depends(query_form(1))],
    responses=error_responses(400, 413, 422),
)
def search_prototypes(service: SearchDep, settings: SettingsDep, file: Files = None, url: Url = None) -> PrototypeResponse:
    """Only stage 1: every category ranked by the active stage-1 ranker (STAGE1), with probabilities."""
    (image,), _ = query_images(file, url, settings, service.image_size)
    (ranking,), timings = service.stage1_ranking([image])
    return PrototypeResponse(categories=[CategoryScoreOut(**vars(c)) for c in ranking], timings_ms=timings)


@router.get(
    "/images/{image_id}/similar",
    response_model=SearchResponse,
    dependencies=[guard(Access.SEARCH)],
    responses=error_responses(404, 422),
)
def similar(image_id: ImageId, service: SearchDep, params: Params) -> SearchResponse:
    """Search with a stored image as the query (the image itself is left out of the results)."""
    return SearchResponse.of(service.similar_to(image_id, params), params)
