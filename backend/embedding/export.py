"""The ONNX export: a model's fp32 network written once as an ONNX graph under the ONNX cache directory
(default DATA_DIR/cache/onnx), named by the fp32 model id; ONNX Runtime sessions (and the int8 graph) are
built from it."""

import logging
import os
import warnings
from pathlib import Path

import torch

from backend.embedding.base import EmbeddingModel

log = logging.getLogger(__name__)


class _Features(torch.nn.Module):
    """The embedding function (network + pooling) as one module, for export."""

    def __init__(self, model: EmbeddingModel, network: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.network = model, network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.network, x)


def graph_path(model: EmbeddingModel, onnx_dir: Path) -> Path:
    return onnx_dir / f"{model.fp32_model_id.replace('/', '_')}.onnx"


def onnx_graph(model: EmbeddingModel, onnx_dir: Path) -> Path:
    """The fp32 graph exported from the weights, once; the network built for it is dropped afterwards."""
    path = graph_path(model, onnx_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    example = torch.zeros(2, 3, model.image_size, model.image_size)
    log.info("exporting %s to ONNX at %s", model.fp32_model_id, path)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about constant folding
        torch.onnx.export(
            _Features(model, model.build_network().eval()),
            (example,), str(tmp), input_names=["pixels"], output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    os.replace(tmp, path)  # atomic: a concurrent process never reads a half-written graph
    return path
