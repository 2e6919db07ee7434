"""Decoding and validation of image bytes."""

import io

import pytest
from PIL import Image

from backend.core.errors import InvalidImage
from backend.imaging import decode_image, make_thumbnail


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    img = Image.new("RGB", (20, 10), (200, 30, 40)).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    decoded = decode_image(encode(img, fmt), 10**6)
    assert decoded.rgb.mode == "RGB" and decoded.rgb.size == (20, 10)


def test_transparent_pixels_become_white() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encode(img), 10**6).rgb.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    decoded = decode_image(encode(img, "JPEG", exif=exif), 10**6)
    assert (decoded.width, decoded.height) == (20, 40)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"GIF89a but not really", "not an image"),
        (b"just some text", "not an image"),
    ],
)
def test_bad_bytes_get_one_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        decode_image(data, 10**6, name="x")


def test_truncated_jpeg_is_refused() -> None:
    data = encode(Image.effect_noise((128, 128), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: len(data) // 2], 10**6)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    data = encode(Image.new("1", (5000, 5000)))
    with pytest.raises(InvalidImage, match="too large"):
        decode_image(data, max_pixels=10**6)


def test_thumbnail_is_small_jpeg() -> None:
    thumb = Image.open(io.BytesIO(make_thumbnail(encode(Image.new("RGB", (640, 320), "red")), 160)))
    assert thumb.format == "JPEG" and thumb.size == (160, 80)


def test_multi_picture_jpeg_from_cameras_is_accepted() -> None:
    first, second = Image.new("RGB", (30, 20), "red"), Image.new("RGB", (30, 20), "blue")
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    decoded = decode_image(buf.getvalue(), 10**6)
    assert decoded.format == "MPO" and decoded.rgb.size == (30, 20)
