"""ResNet-18/50 from torchvision: pretrained weights via its weights API, or a local MODEL_WEIGHTS file."""

import hashlib
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.core.errors import ModelUnavailable
from backend.embedding.base import EmbeddingModel

if TYPE_CHECKING:
    import torch

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255

RANDOM_WEIGHTS = "random"  # tests only: never chosen silently, and recorded in the model id


class ResNetModel(EmbeddingModel):
    """`weights`: a local state-dict file (MODEL_WEIGHTS), "random" (tests), or None for torchvision's."""

    @cached_property
    def weights_id(self) -> str:
        if self.weights == RANDOM_WEIGHTS:
            return RANDOM_WEIGHTS
        if self.weights:
            path = Path(self.weights)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
            return f"file-{digest}"
        return "imagenet1k"

    def build_network(self) -> "torch.nn.Module":
        import torch
        import torchvision.models as tvm

        builder = getattr(tvm, self.name)
        if self.weights == RANDOM_WEIGHTS:
            model = builder(weights=None)
        elif self.weights:
            path = Path(self.weights)
            if not path.is_file():
                raise ModelUnavailable(f"{self.name}: MODEL_WEIGHTS file not found: {path}")
            model = builder(weights=None)
            try:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as exc:
                raise ModelUnavailable(f"{self.name}: MODEL_WEIGHTS {path} is not a {self.name} state dict: {exc}") from exc
        else:
            weights = tvm.get_model_weights(self.name).DEFAULT
            try:
                model = builder(weights=weights)  # downloads into the torch cache the first time
            except Exception as exc:
                raise ModelUnavailable(
                    f"{self.name}: could not obtain pretrained weights ({type(exc).__name__}: {exc}). "
                    f"Remedy: run once with network access to fill the torch cache, or download "
                    f"{weights.url} and set MODEL_WEIGHTS=/path/to/that/file, "
                    "or use MODEL_NAME=efficientnet_lite0 (weights ship with pip)"
                ) from exc
        model.fc = torch.nn.Identity()
        return model

    def normalise_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return (pixels.astype(np.float32) - _IMAGENET_MEAN) / _IMAGENET_STD

    def features(self, network: "torch.nn.Module", batch: "torch.Tensor") -> "torch.Tensor":
        return network(batch)
