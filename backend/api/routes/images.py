"""Upload, fetch, describe and delete images."""

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile

from backend.api.deps import (
    NAME_SCHEMA,
    TEXT_SCHEMA,
    CatalogueDep,
    Description,
    ImageId,
    OneFile,
    OptionalCategoryName,
    SearchDep,
    SettingsDep,
    WritesDep,
)
from backend.api.errors import error_responses
from backend.api.security import Access, guard
from backend.api.uploads import read_image
from backend.imaging import CONTENT_TYPES
from backend.schemas import DeletedOut, ImageInfo, UploadResponse

router = APIRouter(prefix="", tags=["images"])

# Image ids are never reused and stored bytes never change, so cached bytes never go stale.
IMMUTABLE = "public, max-age=31536000, immutable"


def _held_sha256(request: Request) -> str | None:
    """The sha256 of the bytes the client already holds: our ETag is the quoted sha256 (If-None-Match)."""
    held = request.headers.get("if-none-match", "")
    return held[1:-1] if len(held) > 1 and held[0] == held[-1] == '"' else None


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
    service: SearchDep,
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
    return UploadResponse.of(result)


@router.get(
    "/images/{image_id}",
    response_class=Response,
    dependencies=[guard(Access.SEARCH)],
    responses=error_responses(304, 404, 422, ok={200: {"content": {"image/*": {}}, "description": "the original bytes"}}),
)
def image_bytes(image_id: ImageId, catalogue: CatalogueDep, request: Request) -> Response:
    """The original bytes, as uploaded."""
    stored = catalogue.image_bytes(image_id, unless_sha256=_held_sha256(request))
    headers = {"ETag": f'"{stored.sha256}"', "Cache-Control": IMMUTABLE}
    if stored.data is None:
        return Response(status_code=304, headers=headers)
    return Response(stored.data, media_type=CONTENT_TYPES.get(stored.format, "application/octet-stream"), headers=headers)


@router.get(
    "/images/{image_id}/thumbnail",
    response_class=Response,
    dependencies=[guard(Access.SEARCH)],
    responses=error_responses(404, 422, ok={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}}),
)
def thumbnail(image_id: ImageId, catalogue: CatalogueDep) -> Response:
    """A JPEG of at most 160 px a side."""
    return Response(catalogue.thumbnail(image_id), media_type="image/jpeg", headers={"Cache-Control": IMMUTABLE})


@router.get(
    "/images/{image_id}/info", response_model=ImageInfo, dependencies=[guard(Access.SEARCH)], responses=error_responses(404, 422)
)
def info(image_id: ImageId, catalogue: CatalogueDep) -> ImageInfo:
    return catalogue.image_info(image_id)


@router.delete("/images/{image_id}", dependencies=[guard(Access.WRITE)], responses=error_responses(404, 422))
def delete(image_id: ImageId, writes: WritesDep, catalogue: CatalogueDep) -> DeletedOut:
    """Delete the image, its embeddings and its share of the prototype; the index is updated."""
    image = writes.delete(image_id)
    catalogue.forget_thumbnail(image_id)
    return DeletedOut(deleted=image.id)
