"""Near-duplicate groups in the catalogue (backend.search.near_duplicates), a page at a time."""

from typing import Annotated

from fastapi import APIRouter, Query

from backend.api.deps import CatalogueDep, SettingsDep
from backend.api.errors import error_responses
from backend.api.security import Access, guard
from backend.schemas import DuplicatesPage

router = APIRouter(tags=["images"])
PAGE_MAX = 100


@router.get("/duplicates", response_model=DuplicatesPage, dependencies=[guard(Access.SEARCH)], responses=error_responses(422))
def duplicates(
    catalogue: CatalogueDep,
    settings: SettingsDep,
    threshold: Annotated[
        float | None, Query(ge=0.5, le=1.0, allow_inf_nan=False, description="cosine (default NEAR_DUPLICATE_THRESHOLD)")
    ] = None,
    offset: Annotated[int, Query(ge=0, le=2**31, description="groups skipped")] = 0,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="groups per page")] = 20,
) -> DuplicatesPage:
    """Groups of stored images whose embeddings' cosine is at least the threshold, each image compared
    within its category; largest groups first."""
    cut = settings.near_duplicate_threshold if threshold is None else threshold
    return catalogue.duplicates_page(cut, offset, limit)
