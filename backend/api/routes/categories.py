"""Categories and browsing the catalogue."""

from typing import Annotated

from fastapi import APIRouter, Body, Query

from backend.api.deps import BIGINT_MAX, NAME_SCHEMA, CatalogueDep, CategoryId, CategoryName
from backend.api.errors import error_responses
from backend.api.security import Access, guard
from backend.schemas import CategoryOut, ImagePage

router = APIRouter(prefix="/categories", tags=["categories"])


@router.get("", response_model=list[CategoryOut], dependencies=[guard(Access.SEARCH)], responses=error_responses())
def list_categories(catalogue: CatalogueDep) -> list[CategoryOut]:
    """Every category with its image count and how many of those carry a given (not predicted) label."""
    return catalogue.categories()


@router.post(
    "",
    response_model=CategoryOut,
    status_code=201,
    dependencies=[guard(Access.WRITE)],
    responses=error_responses(400, 413, 422),
)
def create_category(
    catalogue: CatalogueDep, name: Annotated[CategoryName, Body(embed=True, json_schema_extra=NAME_SCHEMA)]
) -> CategoryOut:
    """Create an (empty) category so uploads can be labelled with it; an existing name is returned as it is."""
    return catalogue.create_category(name)


@router.get(
    "/{category_id}/images", response_model=ImagePage, dependencies=[guard(Access.SEARCH)], responses=error_responses(404, 422)
)
def category_images(
    category_id: CategoryId,
    catalogue: CatalogueDep,
    offset: Annotated[int, Query(ge=0, le=BIGINT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ImagePage:
    """One page of a category's images, newest id last."""
    return catalogue.category_page(category_id, offset, limit)
