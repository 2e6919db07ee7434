"""The embedder: a model (`base.EmbeddingModel`) and the runtime session that runs it (`sessions`), loaded
on first use, once; images in, L2-normalised float32 vectors out, in batches."""

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from backend.core.config import Settings
from backend.core.errors import ConfigurationError
from backend.core.vectors import l2_normalise
from backend.embedding.base import EmbeddingModel
from backend.embedding.registry import describe
from backend.embedding.sessions import Session, choose_runtime, open_session, resolve_device

if TYPE_CHECKING:
    from backend.embedding.quantize import Calibration


class Embedder:
    """`runtime`: "torch", "onnx" or "auto" (EMBED_RUNTIME); the session is opened by `load` (or the first
    `embed`), under a lock, so threads sharing an embedder load it once."""

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        runtime: str = "auto",
        device: str = "auto",
        batch_size: int = 32,
        onnx_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.device = resolve_device(device)
        self.runtime = choose_runtime(runtime, self.device, onnx_dir)
        if model.precision == "int8" and (self.runtime != "onnx" or model.calibration is None):
            raise ConfigurationError(
                "EMBED_PRECISION=int8 needs the ONNX runtime on CPU (EMBED_RUNTIME=auto or onnx, DEVICE=cpu)"
            )
        self.batch_size = batch_size
        self.onnx_dir = onnx_dir
        self._session: Session | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def calibration(self) -> "Calibration | None":
        return self.model.calibration

    def load(self) -> None:
        with self._lock:
            if self._session is None:
                self._session = open_session(self.model, self.runtime, self.device, self.onnx_dir)

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """RGB image -> (S, S, 3) uint8 model input (see `EmbeddingModel.preprocess`)."""
        return self.model.preprocess(img)

    def embed_pixels(self, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, dim) L2-normalised float32, in batches of `batch_size` (default the
        embedder's)."""
        self.load()
        assert self._session is not None
        step = batch_size or self.batch_size
        out = np.empty((len(pixels), self.dim), dtype=np.float32)
        for start in range(0, len(pixels), step):
            chunk = self.model.normalise_pixels(pixels[start : start + step])
            out[start : start + len(chunk)] = self._session.run(chunk)
        return l2_normalise(out)

    def embed(self, images: Sequence[Image.Image], batch_size: int | None = None) -> np.ndarray:
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.embed_pixels(np.stack([self.preprocess(img) for img in images]), batch_size)


def create_embedder(
    settings: Settings,
    model_name: str | None = None,
    *,
    image_size: int | None = None,
    batch_size: int | None = None,
    runtime: str | None = None,
    weights: str | None = None,
    precision: str | None = None,
) -> Embedder:
    """A new embedder of the settings' model, not loaded yet; keyword arguments override single settings.
    Servers and workers take theirs from `cache.model_cache`, which loads each model once per process."""
    model = describe(settings, model_name, image_size=image_size, weights=weights, precision=precision)
    return Embedder(
        model,
        runtime=runtime or settings.embed_runtime,
        device=settings.device,
        batch_size=batch_size or settings.embed_batch_size,
        onnx_dir=settings.onnx_dir,
    )
