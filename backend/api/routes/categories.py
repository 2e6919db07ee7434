"""Categories and browsing the catalogue."""

from typing import Annotated

from fastapi import APIRouter, Body, Query

from backend.api.deps import BIGINT_MAX, NAME_SCHEMA, CategoryId, CategoryName, ServiceDep
from backend.api.errors import error_responses
from backend.api.schemas import CategoryOut, ImageInfo, ImagePage
from backend.api.security import Access, guard
from backend.core.errors import NotFound
from backend.storage import catalogue
from backend.storage.engine import session_scope

router = APIRouter(prefix="/categories", tags=["categories"])


@router.get("", response_model=list[CategoryOut], dependencies=[guard(Access.SEARCH)], responses=error_responses())
def list_categories(service: ServiceDep) -> list[CategoryOut]:
    """Every category with its image count and how many of those carry a given (not predicted) label."""
    with session_scope(service.engine) as session:
        return [CategoryOut(id=c, name=n, images=i, labelled=g) for c, n, i, g in catalogue.category_counts(session)]


@router.post(
    "",
    response_model=CategoryOut,
    status_code=201,
    dependencies=[guard(Access.WRITE)],
    responses=error_responses(400, 413, 422),
)
def create_category(
    service: ServiceDep, name: Annotated[CategoryName, Body(embed=True, json_schema_extra=NAME_SCHEMA)]
) -> CategoryOut:
    """Create an (empty) category so uploads can be labelled with it; an existing name is returned as it is."""
    with session_scope(service.engine) as session:
        cid = catalogue.ensure_categories(session, [name])[name]
    return next(c for c in list_categories(service) if c.id == cid)


@router.get(
    "/{category_id}/images", response_model=ImagePage, dependencies=[guard(Access.SEARCH)], responses=error_responses(404, 422)
)
def category_images(
    category_id: CategoryId,
    service: ServiceDep,
    offset: Annotated[int, Query(ge=0, le=BIGINT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ImagePage:
    """One page of a category's images, newest id last."""
    with session_scope(service.engine) as session:
        counts = {c: (n, i, g) for c, n, i, g in catalogue.category_counts(session)}
        if category_id not in counts:
            raise NotFound(f"category {category_id} not found")
        name, images, given = counts[category_id]
        items = [ImageInfo.of(img) for img in catalogue.category_page(session, category_id, offset, limit)]
    return ImagePage(
        category=CategoryOut(id=category_id, name=name, images=images, labelled=given),
        total=images,
        offset=offset,
        limit=limit,
        items=items,
    )
