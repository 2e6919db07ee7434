"""Search endpoints. Handlers are plain `def`: FastAPI runs them in its thread pool, so decoding,
embedding and FAISS work never block the event loop."""

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from backend.api.deps import ImageId, OneFile, ServiceDep, SettingsDep
from backend.api.errors import error_responses
from backend.api.schemas import CategoryScoreOut, PrototypeResponse, SearchResponse
from backend.api.security import Access, guard
from backend.api.uploads import read_image
from backend.core import search_params as sp
from backend.core.search_params import SearchParams

router = APIRouter(tags=["search"])

Limit = Annotated[int | None, Query(ge=sp.LIMIT_MIN, le=sp.LIMIT_MAX, description=sp.LIMIT_HELP)]
TopCategories = Annotated[
    int | None, Query(ge=sp.TOP_CATEGORIES_MIN, le=sp.TOP_CATEGORIES_MAX, description=sp.TOP_CATEGORIES_HELP)
]
UsePrototypes = Annotated[bool | None, Query(description=sp.USE_PROTOTYPES_HELP)]
Nprobe = Annotated[int | None, Query(ge=sp.NPROBE_MIN, le=sp.NPROBE_MAX, description=sp.NPROBE_HELP)]


@router.post(
    "/search",
    response_model=SearchResponse,
    dependencies=[guard(Access.SEARCH), OneFile],
    responses=error_responses(400, 413, 422),
)
def search(
    service: ServiceDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="query image")],
    limit: Limit = None,
    use_prototypes: UsePrototypes = None,
    top_categories: TopCategories = None,
    nprobe: Nprobe = None,
) -> SearchResponse:
    """Images most similar to the uploaded one, with cosine scores and per-stage timings."""
    params = SearchParams.resolve(settings, limit, top_categories, use_prototypes, nprobe)
    image = read_image(file, settings)
    (result,) = service.search([image.rgb], params, [image.sha256])
    return SearchResponse.of(result, params.limit)


@router.post(
    "/search/prototypes",
    response_model=PrototypeResponse,
    dependencies=[guard(Access.SEARCH), OneFile],
    responses=error_responses(400, 413, 422),
)
def search_prototypes(
    service: ServiceDep, settings: SettingsDep, file: Annotated[UploadFile, File(description="query image")]
) -> PrototypeResponse:
    """Only stage 1: every category ranked by the active stage-1 ranker (STAGE1), with probabilities."""
    image = read_image(file, settings)
    (ranking,), timings = service.rank_categories([image.rgb])
    return PrototypeResponse(categories=[CategoryScoreOut(**vars(c)) for c in ranking], timings_ms=timings)


@router.get(
    "/images/{image_id}/similar",
    response_model=SearchResponse,
    dependencies=[guard(Access.SEARCH)],
    responses=error_responses(404, 422),
)
def similar(
    image_id: ImageId,
    service: ServiceDep,
    settings: SettingsDep,
    limit: Limit = None,
    use_prototypes: UsePrototypes = None,
    top_categories: TopCategories = None,
    nprobe: Nprobe = None,
) -> SearchResponse:
    """Search with a stored image as the query (the image itself is left out of the results)."""
    params = SearchParams.resolve(settings, limit, top_categories, use_prototypes, nprobe)
    return SearchResponse.of(service.similar_to(image_id, params), params.limit)
