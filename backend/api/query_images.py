"""The query images of a search request: one or several uploaded files (`file`, repeated), or one image
address (`url`), checked before anything is read: one clear 422 for a malformed request."""

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, UploadFile
from PIL import Image
from starlette.datastructures import UploadFile as FormFile

from backend.api.uploads import read_query
from backend.core.config import Settings
from backend.core.errors import Unprocessable
from backend.sources.query_images import image_from_url

FILE_HELP = "query image; several `file` fields search each, one result set per file, in order"
URL_HELP = "instead of a file: the query image's http(s) address, downloaded like URL ingestion"


def query_form(max_files: int) -> Callable[[Request], Coroutine[Any, Any, None]]:
    """A dependency: the form holds 1..max_files files in `file`, or one text `url`, not both."""

    async def check(request: Request) -> None:
        form = await request.form()  # parsed once: the route's own File() and Form() parameters reuse it
        files, urls = form.getlist("file"), form.getlist("url")
        if any(not isinstance(f, FormFile) for f in files):
            raise Unprocessable("file: must be a file upload (multipart/form-data with a filename), not a text field")
        if any(not isinstance(u, str) for u in urls):
            raise Unprocessable("url: must be a text field, not a file")
        if any(not u.strip() for u in urls if isinstance(u, str)):
            raise Unprocessable("url: must not be empty")
        if files and urls:
            raise Unprocessable("file, url: send the query image as a file or as a URL, not both")
        if not files and not urls:
            raise Unprocessable("file: send a query image in the field 'file', or its address in 'url'")
        if len(urls) > 1:
            raise Unprocessable(f"url: send one URL, not {len(urls)}")
        if len(files) > max_files:
            wanted = "one file" if max_files == 1 else f"at most {max_files} files"
            raise Unprocessable(f"file: send {wanted} in the field 'file', not {len(files)}")

    return check


def query_images(
    files: list[UploadFile] | None, url: str | None, settings: Settings, side: int
) -> tuple[list[Image.Image], list[str]]:
    """The query images as RGB and the sha256 of their bytes, in the order sent (run in a worker thread:
    reads and downloads block); an uploaded file is decoded only as far as a model with `side` px input needs."""
    if url is not None:
        image = image_from_url(url, settings)
        return [image.rgb], [image.sha256]
    if not files:  # query_form let nothing through without a file or a URL; this says so if it ever does
        raise Unprocessable("file: send a query image in the field 'file', or its address in 'url'")
    read = [read_query(f, settings, side) for f in files]
    return [image for image, _ in read], [sha for _, sha in read]
