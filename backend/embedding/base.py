"""The embedding model interface: lazy loading, batched inference, L2-normalised float32 output.

Two runtimes compute the same function from the same weights: PyTorch, and on CPU (by default, when
onnxruntime is installed) ONNX Runtime on a graph exported from the PyTorch model once and cached under
DATA_DIR/cache/onnx. ONNX Runtime is about 3x faster here; its vectors match PyTorch's to ~1e-5, so both
share one model id. EMBED_PRECISION=int8 runs that graph quantized (`quantize`): about twice as fast again
on CPUs with 8-bit dot products, at a measured accuracy cost; its vectors carry a model id of their own.
"""

import logging
import os
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.core.errors import ConfigurationError
from backend.embedding import quantize
from backend.embedding.models import ModelSpec
from backend.imaging import decode_image
from backend.vectors import l2_normalise

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("DEVICE=cuda but no CUDA device is available (use DEVICE=auto or cpu)")
    return torch.device(device)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Features(torch.nn.Module):
    """The embedding function as one module, for export."""

    def __init__(self, embedder: "Embedder", model: torch.nn.Module) -> None:
        super().__init__()
        self.embedder, self.model = embedder, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder._features(self.model, x)


class Embedder(ABC):
    """Subclasses build the network in `_load`; it runs on the first `embed` call, once per process."""

    def __init__(
        self,
        *,
        spec: ModelSpec,
        image_size: int | None = None,
        device: str = "auto",
        batch_size: int = 32,
        runtime: str = "torch",
        onnx_dir: Path | None = None,
        weights: str | None = None,
        precision: str = "fp32",
        calibration: quantize.Calibration | None = None,
    ) -> None:
        self.spec = spec
        self.name, self.dim = spec.name, spec.dim
        self.weights = weights
        self.image_size = image_size or spec.input_size
        self.device = resolve_device(device)
        self.batch_size = batch_size
        if runtime == "auto":
            runtime = "onnx" if self.device.type == "cpu" and onnx_dir is not None and onnxruntime_available() else "torch"
        if runtime == "onnx" and (onnx_dir is None or not onnxruntime_available()):
            raise ConfigurationError("EMBED_RUNTIME=onnx needs onnxruntime installed (pip install onnxruntime onnx)")
        if precision == "int8" and (runtime != "onnx" or calibration is None):
            raise ConfigurationError(
                "EMBED_PRECISION=int8 needs the ONNX runtime on CPU (EMBED_RUNTIME=auto or onnx, DEVICE=cpu)"
            )
        self.runtime = runtime
        self.precision = precision
        self.calibration = calibration
        self.onnx_dir = onnx_dir
        self._model: torch.nn.Module | None = None
        self._session: Any = None
        self._lock = threading.Lock()

    @property
    @abstractmethod
    def weights_id(self) -> str:
        """Names the weights, e.g. 'imagenet' or 'random'; part of the model id stored with vectors."""

    @property
    def model_id(self) -> str:
        # Vectors are only comparable when network, weights, input size and quantization all match.
        if self.precision == "int8":
            assert self.calibration is not None
            return f"{self.fp32_model_id}/int8-{self.calibration.digest}"
        return self.fp32_model_id

    @property
    def fp32_model_id(self) -> str:
        """The unquantized model's id: it names the exported graph, which int8 is quantized from."""
        return f"{self.name}/{self.weights_id}/{self.image_size}px"

    @abstractmethod
    def _load(self) -> torch.nn.Module: ...

    @abstractmethod
    def _features(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) input -> (N, dim) pooled features."""

    @abstractmethod
    def _normalise_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> float32 model input scaling."""

    def _torch_model(self) -> torch.nn.Module:
        if self._model is None:
            model = self._load().eval().to(self.device)
            if self.device.type == "cpu":
                # NHWC is about 2x faster for these conv nets on CPU (measured here).
                model = model.to(memory_format=torch.channels_last)
            self._model = model
        return self._model

    def _onnx_graph(self) -> Path:
        """The fp32 graph exported from the weights, once (the model; sessions are built from it)."""
        assert self.onnx_dir is not None
        path = self.onnx_dir / f"{self.fp32_model_id.replace('/', '_')}.onnx"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        example = torch.zeros(2, 3, self.image_size, self.image_size)
        log.info("exporting %s to ONNX at %s", self.fp32_model_id, path)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter about constant folding
            torch.onnx.export(
                _Features(self, self._torch_model().to(memory_format=torch.contiguous_format)),
                (example,), str(tmp), input_names=["pixels"], output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, dynamo=False,
            )  # fmt: skip
        os.replace(tmp, path)  # atomic: a concurrent process never reads a half-written graph
        self._model = None  # the session replaces it
        return path

    def calibration_inputs(self) -> np.ndarray:
        """The calibration images as model inputs, (N, 3, S, S) float32."""
        assert self.calibration is not None
        pixels = np.stack([self.preprocess(decode_image(data, 10**8, src).rgb) for src, data in self.calibration.images])
        return np.ascontiguousarray(self._normalise_pixels(pixels).transpose(0, 3, 1, 2))

    def _onnx_session(self) -> Any:
        fp32_path = self._onnx_graph()
        if self.precision != "int8":
            return _ort_session(fp32_path)
        assert self.calibration is not None
        inputs = self.calibration_inputs()
        session = _ort_session(quantize.quantize(fp32_path, self.calibration, inputs))
        speedup = quantize.measured_speedup(_ort_session(fp32_path), session, inputs[:8])
        log.info("int8 embedding: %.2fx the fp32 speed at batch 8 (measured at start-up)", speedup)
        warning = quantize.speed_warning(speedup)
        if warning:
            log.warning(warning)
        return session

    def load(self) -> None:
        with self._lock:
            if self.runtime == "onnx":
                if self._session is None:
                    self._session = self._onnx_session()
            else:
                self._torch_model()

    @property
    def loaded(self) -> bool:
        return self._model is not None or self._session is not None

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """RGB image -> (S, S, 3) uint8: the centred square of side min(w, h), resized to S x S.

        Only that box is resampled, straight to S x S, so memory is O(S^2) whatever the aspect ratio
        (scaling the short side up first made a 10,000 x 1 PNG of ~100 bytes cost gigabytes)."""
        s = self.image_size
        side = min(img.width, img.height)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        square = img.resize((s, s), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        return np.asarray(square, dtype=np.uint8)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) float32 -> (n, dim) features, on the chosen runtime."""
        if self._session is not None:
            return self._session.run(None, {"pixels": np.ascontiguousarray(chunk.transpose(0, 3, 1, 2))})[0]
        with torch.inference_mode():
            batch = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(self.device)  # NHWC memory, NCHW view
            return self._features(self._torch_model(), batch).float().cpu().numpy()

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, dim) L2-normalised float32, in batches of `batch_size`."""
        self.load()
        out = np.empty((len(pixels), self.dim), dtype=np.float32)
        for start in range(0, len(pixels), self.batch_size):
            chunk = self._normalise_pixels(pixels[start : start + self.batch_size])
            out[start : start + len(chunk)] = self._run(chunk)
        return l2_normalise(out)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.embed_pixels(np.stack([self.preprocess(img) for img in images]))


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Idle intra-op threads spin-wait for the next operator by default, taking a core from decoding, the
    # database and HTTP: off, a search request on a busy 2-core machine took half the time (issue 22).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
