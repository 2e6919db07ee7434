"""Upload, fetch, describe and delete images."""

from collections import OrderedDict
from threading import Lock
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile

from backend.api.deps import (
    NAME_SCHEMA,
    TEXT_SCHEMA,
    Description,
    ImageId,
    OneFile,
    OptionalCategoryName,
    ServiceDep,
    SettingsDep,
)
from backend.api.errors import error_responses
from backend.api.schemas import DeletedOut, ImageInfo, SearchHit, UploadResponse, image_urls
from backend.api.security import Access, guard
from backend.api.uploads import read_image
from backend.imaging import CONTENT_TYPES, make_thumbnail
from backend.storage import catalogue
from backend.storage.engine import session_scope

router = APIRouter(prefix="", tags=["images"])

# Image ids are never reused and stored bytes never change, so cached bytes never go stale.
IMMUTABLE = "public, max-age=31536000, immutable"


class _ThumbnailCache:
    def __init__(self, size: int = 2048) -> None:
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._size = size
        self._lock = Lock()

    def get(self, key: int) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def discard(self, key: int) -> None:
        with self._lock:
            self._items.pop(key, None)

    def put(self, key: int, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            if len(self._items) > self._size:
                self._items.popitem(last=False)


_thumbnails = _ThumbnailCache()


def _not_modified(request: Request, etag: str) -> bool:
    return request.headers.get("if-none-match") == etag


@router.post(
    "/upload",
    response_model=UploadResponse,
    status_code=201,
    dependencies=[guard(Access.WRITE), OneFile],
    responses=error_responses(
        400, 409, 413, 422, ok={200: {"model": UploadResponse, "description": "these exact bytes were stored before"}}
    ),
)
def upload(
    service: ServiceDep,
    settings: SettingsDep,
    response: Response,
    file: Annotated[UploadFile, File(description="image file")],
    category: Annotated[
        OptionalCategoryName,
        Form(description="existing category; predicted by stage 1 if absent", json_schema_extra=NAME_SCHEMA),
    ] = None,
    description: Annotated[Description, Form(description="free text", json_schema_extra=TEXT_SCHEMA)] = None,
    on_near_duplicate: Annotated[
        Literal["keep", "refuse"], Form(description="refuse: do not store an image with stored near-duplicates (409)")
    ] = "keep",
) -> UploadResponse:
    """Store an image with its embedding; it is searchable at once. Exact duplicates are not stored twice;
    near-duplicates (cosine at least NEAR_DUPLICATE_THRESHOLD) are listed, or refused on request."""
    image = read_image(file, settings)
    result = service.upload(image, category, description, refuse_near_duplicates=on_near_duplicate == "refuse")
    if result.duplicate:
        response.status_code = 200
    return UploadResponse(
        image_id=result.image_id,
        duplicate=result.duplicate,
        category=result.category,
        label_given=result.label_given,
        category_score=result.category_score,
        category_probability=result.category_probability,
        near_duplicates=[SearchHit.of(h) for h in result.near_duplicates],
        **image_urls(result.image_id),
    )


@router.get(
    "/images/{image_id}",
    response_class=Response,
    dependencies=[guard(Access.SEARCH)],
    responses=error_responses(304, 404, 422, ok={200: {"content": {"image/*": {}}, "description": "the original bytes"}}),
)
def image_bytes(image_id: ImageId, service: ServiceDep, request: Request) -> Response:
    """The original bytes, as uploaded."""
    with session_scope(service.engine) as session:
        image = catalogue.get_image(session, image_id)
        etag = f'"{image.sha256}"'
        if _not_modified(request, etag):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMMUTABLE})
        data, fmt = image.data, image.format
    return Response(
        data, media_type=CONTENT_TYPES.get(fmt, "application/octet-stream"), headers={"ETag": etag, "Cache-Control": IMMUTABLE}
    )


@router.get(
    "/images/{image_id}/thumbnail",
    response_class=Response,
    dependencies=[guard(Access.SEARCH)],
    responses=error_responses(404, 422, ok={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}}),
)
def thumbnail(image_id: ImageId, service: ServiceDep) -> Response:
    """A JPEG of at most 160 px a side."""
    data = _thumbnails.get(image_id)
    if data is None:
        with session_scope(service.engine) as session:
            data = make_thumbnail(catalogue.get_image(session, image_id).data)
        _thumbnails.put(image_id, data)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": IMMUTABLE})


@router.get(
    "/images/{image_id}/info", response_model=ImageInfo, dependencies=[guard(Access.SEARCH)], responses=error_responses(404, 422)
)
def info(image_id: ImageId, service: ServiceDep) -> ImageInfo:
    with session_scope(service.engine) as session:
        return ImageInfo.of(catalogue.get_image(session, image_id))


@router.delete("/images/{image_id}", dependencies=[guard(Access.WRITE)], responses=error_responses(404, 422))
def delete(image_id: ImageId, service: ServiceDep) -> DeletedOut:
    """Delete the image, its embeddings and its share of the prototype; the index is updated."""
    image = service.delete(image_id)
    _thumbnails.discard(image_id)
    return DeletedOut(deleted=image.id)
