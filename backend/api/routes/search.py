"""Search endpoints. Handlers are plain `def`: FastAPI runs them in its thread pool, so decoding,
embedding and FAISS work never block the event loop."""

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from backend.api.deps import ServiceDep, SettingsDep
from backend.api.schemas import CategoryScoreOut, PrototypeResponse, SearchResponse
from backend.api.uploads import read_image

router = APIRouter(tags=["search"])

Limit = Annotated[int | None, Query(ge=1, le=50, description="number of results (default DEFAULT_SEARCH_LIMIT)")]
TopCategories = Annotated[int | None, Query(ge=1, le=10, description="categories searched in stage 2 (default 3)")]
UsePrototypes = Annotated[
    bool | None, Query(description="two-stage search over the top categories (default USE_PROTOTYPE_FILTERING)")
]


@router.post("/search", response_model=SearchResponse)
def search(
    service: ServiceDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="query image")],
    limit: Limit = None,
    use_prototypes: UsePrototypes = None,
    top_categories: TopCategories = None,
) -> SearchResponse:
    """Images most similar to the uploaded one, with cosine scores and per-stage timings."""
    image = read_image(file, settings)
    limit = limit or settings.default_search_limit
    use = settings.use_prototype_filtering if use_prototypes is None else use_prototypes
    (result,) = service.search([image.rgb], limit, top_categories or settings.default_top_categories, use)
    return SearchResponse.of(result, limit)


@router.post("/search/prototypes", response_model=PrototypeResponse)
def search_prototypes(
    service: ServiceDep, settings: SettingsDep, file: Annotated[UploadFile, File(description="query image")]
) -> PrototypeResponse:
    """Only stage 1: every category ranked by the cosine similarity of its prototype to the image."""
    image = read_image(file, settings)
    (ranking,), timings = service.rank_categories([image.rgb])
    return PrototypeResponse(categories=[CategoryScoreOut(**vars(c)) for c in ranking], timings_ms=timings)


@router.get("/images/{image_id}/similar", response_model=SearchResponse)
def similar(
    image_id: int,
    service: ServiceDep,
    settings: SettingsDep,
    limit: Limit = None,
    use_prototypes: UsePrototypes = None,
    top_categories: TopCategories = None,
) -> SearchResponse:
    """Search with a stored image as the query (the image itself is left out of the results)."""
    limit = limit or settings.default_search_limit
    use = settings.use_prototype_filtering if use_prototypes is None else use_prototypes
    result = service.similar_to(image_id, limit, top_categories or settings.default_top_categories, use)
    return SearchResponse.of(result, limit)
