"""What the page draws: the prototype gallery and the 2-D map of the catalogue (backend.catalogue_views)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from backend import catalogue_views
from backend.api.deps import ServiceDep, SettingsDep
from backend.api.errors import error_responses
from backend.api.query_images import query_form, query_images
from backend.api.routes.search import Files, Url
from backend.api.schemas import image_urls
from backend.api.security import Access, guard
from backend.service import SearchService
from backend.storage import catalogue
from backend.storage.engine import session_scope

router = APIRouter(tags=["catalogue"])
GALLERY_MAX = 24


class GalleryImage(BaseModel):
    image_id: int
    score: float  # cosine to the category's prototype
    url: str
    thumbnail_url: str


class GalleryCategory(BaseModel):
    category_id: int
    category: str
    images: list[GalleryImage]


class Gallery(BaseModel):
    categories: list[GalleryCategory]


class MapPoint(BaseModel):
    image_id: int
    category: str | None
    x: float
    y: float


class MapOut(BaseModel):
    points: list[MapPoint]  # an evenly spread sample of at most MAP_POINTS stored images
    explained: list[float]  # share of the variance along x and y


class Position(BaseModel):
    x: float
    y: float


def _names(service: SearchService) -> dict[int, str]:
    with session_scope(service.engine) as session:
        return {cid: name for name, cid in catalogue.category_ids(session).items()}


@router.get("/prototypes/gallery", response_model=Gallery, dependencies=[guard(Access.SEARCH)], responses=error_responses(422))
def gallery(
    service: ServiceDep,
    per_category: Annotated[int, Query(ge=1, le=GALLERY_MAX, description="images per category")] = 6,
) -> Gallery:
    """Per category, the stored images nearest its prototype: what the system thinks the category looks like."""
    names = _names(service)
    rows = catalogue_views.gallery(service, per_category)
    return Gallery(
        categories=[
            GalleryCategory(
                category_id=r.category_id,
                category=names.get(r.category_id, ""),
                images=[GalleryImage(image_id=i, score=s, **image_urls(i)) for i, s in zip(r.image_ids, r.scores, strict=True)],
            )
            for r in rows
        ]
    )


@router.get("/map", response_model=MapOut, dependencies=[guard(Access.SEARCH)], responses=error_responses())
def catalogue_map(service: ServiceDep) -> MapOut:
    """The catalogue projected to 2-D (PCA of the embeddings), computed once per catalogue state."""
    names = _names(service)
    made = catalogue_views.catalogue_map(service)
    points = [
        MapPoint(image_id=int(i), category=names.get(int(c)), x=float(x), y=float(y))
        for i, c, (x, y) in zip(made.ids, made.category_ids, made.xy, strict=True)
    ]
    return MapOut(points=points, explained=made.explained)


@router.post(
    "/map/place",
    response_model=Position,
    dependencies=[guard(Access.SEARCH), Depends(query_form(1))],
    responses=error_responses(400, 413, 422),
)
def place(service: ServiceDep, settings: SettingsDep, file: Files = None, url: Url = None) -> Position:
    """Where a query image (a file, or `url`) falls on the map."""
    (image,), _ = query_images(file, url, settings, service.embedder.image_size)
    x, y = catalogue_views.catalogue_map(service).place(service.embed([image]))[0]
    return Position(x=float(x), y=float(y))
