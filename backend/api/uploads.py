"""Reading an uploaded file within MAX_UPLOAD_SIZE and decoding it, off the event loop."""

from fastapi import UploadFile

from backend.core.config import Settings
from backend.core.errors import PayloadTooLarge
from backend.core.text import echo
from backend.imaging import DecodedImage, decode_image


def read_image(file: UploadFile, settings: Settings) -> DecodedImage:
    data = file.file.read(settings.max_upload_size + 1)
    if len(data) > settings.max_upload_size:
        raise PayloadTooLarge(f"file larger than MAX_UPLOAD_SIZE ({settings.max_upload_size:,} bytes)")
    return decode_image(data, settings.max_image_pixels, name=echo(file.filename or "upload"))
