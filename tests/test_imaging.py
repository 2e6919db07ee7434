"""Decoding and validation of image bytes."""

import io

import pytest
from PIL import Image

from backend.core.errors import InvalidImage
from backend.imaging import decode_for_model, decode_image, make_thumbnail
from tests.utils.images import photo_jpeg


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


# Reduced (DCT-scaled) JPEG decoding for queries, against the full decode: cosine of the Lite0 vectors,
# measured on these photos: 0.9986 (768x576), 0.9984 (576x768), 0.9992 (1024x768), 0.9988 (2048x1536),
# 0.9869 (450x450: decoded at 225 px, the least margin above the 224 px input).
REDUCED_DECODE_COSINE = 0.98


@pytest.mark.parametrize("size", [(768, 576), (576, 768), (1024, 768), (2048, 1536), (450, 450)])
def test_reduced_decoding_gives_the_full_decodings_vector(embedder, size: tuple[int, int]) -> None:
    data = photo_jpeg(*size)
    side = embedder.image_size
    reduced = decode_for_model(data, 10**8, side)
    assert side <= min(reduced.size) < min(size) and reduced.mode == "RGB"  # less decoded, never below the input
    cosine = (embedder.embed([decode_image(data, 10**8).rgb]) @ embedder.embed([reduced]).T).item()
    assert cosine > REDUCED_DECODE_COSINE


def test_reduced_decoding_checks_like_the_full_one() -> None:
    png_data = encode(Image.effect_noise((300, 300), 50).convert("RGB"))
    assert decode_for_model(png_data, 10**6, 224).tobytes() == decode_image(png_data, 10**6).rgb.tobytes()  # not a JPEG: whole
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_for_model(encode(Image.new("RGB", (800, 400), "blue"), "JPEG", exif=exif), 10**6, 100)
    assert rotated.size == (100, 200)  # reduced 4x (short side 100), then turned upright
    jpeg = encode(Image.effect_noise((512, 512), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage, match="truncated"):
        decode_for_model(jpeg[: len(jpeg) // 2], 10**6, 224)
    with pytest.raises(InvalidImage, match="too large"):
        decode_for_model(encode(Image.new("1", (5000, 5000))), 10**6, 224)
