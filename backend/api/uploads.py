"""Reading an uploaded file within MAX_UPLOAD_SIZE and decoding it, off the event loop."""

import hashlib

from fastapi import UploadFile
from PIL.Image import Image

from backend.core.config import Settings
from backend.core.errors import PayloadTooLarge
from backend.core.text import echo
from backend.imaging import DecodedImage, decode_for_model, decode_image


def _read(file: UploadFile, settings: Settings) -> bytes:
    data = file.file.read(settings.max_upload_size + 1)
    if len(data) > settings.max_upload_size:
        raise PayloadTooLarge(f"file larger than MAX_UPLOAD_SIZE ({settings.max_upload_size:,} bytes)")
    return data


def read_image(file: UploadFile, settings: Settings) -> DecodedImage:
    """An image to store: fully decoded and hashed."""
    return decode_image(_read(file, settings), settings.max_image_pixels, name=echo(file.filename or "upload"))


def read_query(file: UploadFile, settings: Settings, side: int) -> tuple[Image, str]:
    """A query image: only what a model with `side` px input needs is decoded (nothing is stored); with
    the sha256 of its bytes, so that a stored image finds itself (backend/search/own_image.py)."""
    data = _read(file, settings)
    image = decode_for_model(data, settings.max_image_pixels, side, name=echo(file.filename or "upload"))
    return image, hashlib.sha256(data).hexdigest()
