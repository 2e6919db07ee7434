"""What the page draws: the prototype gallery and the 2-D map of the catalogue (backend.services.catalogue_views)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from backend.api.deps import CatalogueDep, SearchDep, SettingsDep
from backend.api.errors import error_responses
from backend.api.query_images import query_form, query_images
from backend.api.routes.search import Files, Url
from backend.api.security import Access, guard
from backend.schemas import Gallery, MapOut, Position

router = APIRouter(tags=["catalogue"])
GALLERY_MAX = 24


@router.get("/prototypes/gallery", response_model=Gallery, dependencies=[guard(Access.SEARCH)], responses=error_responses(422))
def gallery(
    catalogue: CatalogueDep,
    per_category: Annotated[int, Query(ge=1, le=GALLERY_MAX, description="images per category")] = 6,
) -> Gallery:
    """Per category, the stored images nearest its prototype: what the system thinks the category looks like."""
    return catalogue.gallery(per_category)


@router.get("/map", response_model=MapOut, dependencies=[guard(Access.SEARCH)], responses=error_responses())
def catalogue_map(catalogue: CatalogueDep) -> Response:
    """The catalogue projected to 2-D (PCA of the embeddings), computed once per catalogue state."""
    return Response(catalogue.catalogue_map_json(), media_type="application/json")


@router.post(
    "/map/place",
    response_model=Position,
    dependencies=[guard(Access.SEARCH), Depends(query_form(1))],
    responses=error_responses(400, 413, 422),
)
def place(catalogue: CatalogueDep, search: SearchDep, settings: SettingsDep, file: Files = None, url: Url = None) -> Position:
    """Where a query image (a file, or `url`) falls on the map."""
    (image,), _ = query_images(file, url, settings, search.image_size)
    return catalogue.place(image)
