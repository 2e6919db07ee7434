"""Near-duplicate groups in the catalogue (backend.near_duplicates), a page at a time."""

from typing import Annotated

from fastapi import APIRouter, Query

from backend import near_duplicates
from backend.api.deps import ServiceDep, SettingsDep
from backend.api.errors import error_responses
from backend.api.schemas import DuplicateGroup, DuplicateImage, DuplicatesPage, image_urls
from backend.api.security import Access, guard
from backend.storage import catalogue
from backend.storage.engine import session_scope

router = APIRouter(tags=["images"])
PAGE_MAX = 100


@router.get("/duplicates", response_model=DuplicatesPage, dependencies=[guard(Access.SEARCH)], responses=error_responses(422))
def duplicates(
    service: ServiceDep,
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
    found = near_duplicates.groups(service, cut)
    with session_scope(service.engine) as session:
        names = {cid: name for name, cid in catalogue.category_ids(session).items()}
    page = [
        DuplicateGroup(
            category=names.get(g.category_id) if g.category_id is not None else None,
            images=[DuplicateImage(image_id=i, **image_urls(i)) for i in g.image_ids],
            min_score=g.min_score,
            max_score=g.max_score,
        )
        for g in found[offset : offset + limit]
    ]
    return DuplicatesPage(threshold=cut, total=len(found), offset=offset, limit=limit, groups=page)
