"""Image bytes for tests."""

import io

from PIL import Image


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def reencoded(image: bytes) -> bytes:
    """The same pixels in other bytes (a PNG at another compression level): a search finds it by its
    embedding, never by the stored image's sha256."""
    out = io.BytesIO()
    Image.open(io.BytesIO(image)).save(out, "PNG", compress_level=1)
    assert out.getvalue() != image
    return out.getvalue()


def photo_jpeg(width: int = 768, height: int = 576, quality: int = 90) -> bytes:
    """A real photograph (Grace Hopper, 512x600, shipped with matplotlib) as a JPEG of the given size."""
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as src:
        buf = io.BytesIO()
        src.convert("RGB").resize((width, height), Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
