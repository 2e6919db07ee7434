"""Near-duplicate groups kept in the database (backend.search.near_duplicates), a page at a time."""

from typing import Annotated

from fastapi import APIRouter, Query

from backend.api.deps import CatalogueDep
from backend.api.errors import error_responses
from backend.api.security import Access, guard
from backend.schemas import DuplicatesPage

router = APIRouter(tags=["images"])
PAGE_MAX = 100


@router.get("/duplicates", response_model=DuplicatesPage, dependencies=[guard(Access.SEARCH)], responses=error_responses(422))
def duplicates(
    catalogue: CatalogueDep,
    threshold: Annotated[
        float | None,
        Query(ge=0.5, le=1.0, allow_inf_nan=False, description="NEAR_DUPLICATE_THRESHOLD, the only one kept (others: 422)"),
    ] = None,
    offset: Annotated[int, Query(ge=0, le=2**31, description="groups skipped")] = 0,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="groups per page")] = 20,
) -> DuplicatesPage:
    """Groups of stored images linked by an embedding cosine of at least NEAR_DUPLICATE_THRESHOLD (across
    categories), kept in the database as images arrive; largest groups first. `links_behind` says how many
    stored images the server has not linked yet."""
    return catalogue.duplicates_page(threshold, offset, limit)
