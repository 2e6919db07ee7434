"""Decoding and validating image bytes, and making thumbnails."""

import hashlib
import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.core.errors import InvalidImage

# Formats we store and serve; anything else Pillow can open is refused rather than guessed at.
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # what Pillow calls many phone-camera JPEGs
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageBytes:
    """What the catalogue stores of an image."""

    data: bytes  # the original bytes, stored as given
    sha256: str
    format: str
    width: int  # after EXIF orientation
    height: int


@dataclass(frozen=True)
class DecodedImage(ImageBytes):
    rgb: Image.Image


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: rescale to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        span = float(arr.max() - arr.min()) or 1.0
        return Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


@contextmanager
def _opened(data: bytes, max_pixels: int, name: str) -> Iterator[Image.Image]:
    """The image `data` holds, checked (format, size) before any pixel is decoded; every failure inside the
    block (corrupt or truncated data, bombs) becomes one InvalidImage line."""
    if not data:
        raise InvalidImage(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or ""
            if fmt not in CONTENT_TYPES:
                raise InvalidImage(f"{name}: unsupported image format {fmt or 'unknown'}")
            if img.width * img.height > max_pixels:
                raise InvalidImage(
                    f"{name}: image too large ({img.width}x{img.height} pixels; the limit is "
                    f"{max_pixels:,} pixels, MAX_IMAGE_PIXELS)"
                )
            yield img
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"{name}: image too large (decompression bomb): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"{name}: not an image (no supported image format recognised)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"{name}: corrupt or truncated image ({exc})") from exc


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> DecodedImage:
    """Validate and fully decode `data`; raises InvalidImage with one clear line otherwise."""
    with _opened(data, max_pixels, name) as img:
        fmt = img.format or ""
        img.load()  # forces a full decode: truncated or corrupt data fails here
        rgb = _to_rgb(img)
    return DecodedImage(data, sha256_of(data), fmt, rgb.width, rgb.height, rgb)


def decode_for_model(data: bytes, max_pixels: int, side: int, name: str = "image") -> Image.Image:
    """Only the pixels a model with `side` x `side` input needs, as RGB: a JPEG is decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that keeps its short side at least `side`, which skips most of the decoding
    of a large photo; other formats are decoded whole. For queries, which are neither stored nor hashed;
    the vector differs from a full decode's within the tolerance tests/test_imaging.py measures."""
    with _opened(data, max_pixels, name) as img:
        if img.format in ("JPEG", "MPO"):
            short = min(img.width, img.height)
            scale = side / short
            img.draft("RGB", (max(1, math.ceil(img.width * scale)), max(1, math.ceil(img.height * scale))))
        img.load()
        return _to_rgb(img)


def encode_png(pixels: np.ndarray) -> bytes:
    """HxWx3 or HxW uint8 array -> PNG bytes (how dataset arrays are stored as originals)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def make_thumbnail(data: bytes, size: int = 160) -> bytes:
    """A JPEG thumbnail no larger than `size` px. Small images are scaled up so they stay visible."""
    img = _to_rgb(Image.open(io.BytesIO(data)))
    scale = size / max(img.width, img.height)
    new_size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS
    img = img.resize(new_size, resample)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
