"""The runtimes that run an embedding model's network: a PyTorch session (GPU, or CPU without onnxruntime;
also what the ONNX graph is exported from) and an ONNX Runtime session on the exported graph, fp32 or int8.

ONNX Runtime is about 3x faster than PyTorch on CPU here; its vectors match PyTorch's to ~1e-5, so both share
one model id. int8 runs the graph quantized (`quantize`): about twice as fast again on CPUs with 8-bit dot
products, at a measured accuracy cost; its vectors carry a model id of their own.
"""

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from backend.core.errors import ConfigurationError
from backend.embedding import quantize
from backend.embedding.base import EmbeddingModel
from backend.embedding.export import onnx_graph
from backend.imaging import decode_image

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


def choose_runtime(runtime: str, device: torch.device, onnx_dir: Path | None) -> str:
    """EMBED_RUNTIME resolved: "auto" is ONNX Runtime on CPU when it is installed and has a cache directory."""
    if runtime == "auto":
        runtime = "onnx" if device.type == "cpu" and onnx_dir is not None and onnxruntime_available() else "torch"
    if runtime == "onnx" and (onnx_dir is None or not onnxruntime_available()):
        raise ConfigurationError("EMBED_RUNTIME=onnx needs onnxruntime installed (pip install onnxruntime onnx)")
    return runtime


class Session(Protocol):
    def run(self, chunk: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) float32 model input -> (n, dim) features."""
        ...


class TorchSession:
    """The network in PyTorch on `device`, weights loaded at construction."""

    def __init__(self, model: EmbeddingModel, device: torch.device) -> None:
        network = model.build_network().eval().to(device)
        if device.type == "cpu":
            # NHWC is about 2x faster for these conv nets on CPU (measured here).
            network = network.to(memory_format=torch.channels_last)
        self.model, self.network, self.device = model, network, device

    def run(self, chunk: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(self.device)  # NHWC memory, NCHW view
            return self.model.features(self.network, batch).float().cpu().numpy()


class OrtSession:
    """An ONNX Runtime CPU session on one graph file (fp32 or int8)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Idle intra-op threads spin-wait for the next operator by default, taking a core from decoding, the
        # database and HTTP: off, a search request on a busy 2-core machine took half the time (issue 22).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ONNX Runtime's CPU arena keeps the largest batch's activations for the process's life (and grows in
        # powers of two): measured in a server process, +340 MB after one batch of 32 Lite0 inputs, +100 MB
        # without it, at the same speed on this 2-core machine. Off: a catalogue job does not inflate the server.
        options.enable_cpu_mem_arena = False
        self.path = path
        self.session: Any = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, chunk: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(chunk.transpose(0, 3, 1, 2))})[0]


def calibration_inputs(model: EmbeddingModel, calibration: quantize.Calibration) -> np.ndarray:
    """The calibration images as `model`'s inputs, (N, 3, S, S) float32."""
    pixels = np.stack([model.preprocess(decode_image(data, 10**8, src).rgb) for src, data in calibration.images])
    return np.ascontiguousarray(model.normalise_pixels(pixels).transpose(0, 3, 1, 2))


def onnx_session(model: EmbeddingModel, onnx_dir: Path) -> OrtSession:
    """A session on the exported graph, or for int8 on the graph quantized from it (its speed-up measured
    once here, and said when it does not pay)."""
    fp32_path = onnx_graph(model, onnx_dir)
    if model.precision != "int8":
        return OrtSession(fp32_path)
    assert model.calibration is not None
    inputs = calibration_inputs(model, model.calibration)
    session = OrtSession(quantize.quantize(fp32_path, model.calibration, inputs))
    speedup = quantize.measured_speedup(OrtSession(fp32_path).session, session.session, inputs[:8])
    log.info("int8 embedding: %.2fx the fp32 speed at batch 8 (measured at start-up)", speedup)
    warning = quantize.speed_warning(speedup)
    if warning:
        log.warning(warning)
    return session


def open_session(model: EmbeddingModel, runtime: str, device: torch.device, onnx_dir: Path | None) -> Session:
    """The session for a runtime chosen by `choose_runtime` (this is where the weights load)."""
    if runtime == "onnx":
        assert onnx_dir is not None
        return onnx_session(model, onnx_dir)
    return TorchSession(model, device)
