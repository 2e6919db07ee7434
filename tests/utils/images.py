"""Image bytes for tests."""

import io

from PIL import Image


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def photo_jpeg(width: int = 768, height: int = 576, quality: int = 90) -> bytes:
    """A real photograph (Grace Hopper, 512x600, shipped with matplotlib) as a JPEG of the given size."""
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as src:
        buf = io.BytesIO()
        src.convert("RGB").resize((width, height), Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
