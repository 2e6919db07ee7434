"""What an embedding model is, apart from what runs it: its identity (the model id stored with every vector),
its input (size, cropping, pixel scaling) and how its network is built from the weights.

Building a model description loads nothing (no framework, no weights), so the model id is known at once;
`sessions` runs the network (PyTorch, or ONNX Runtime on the exported graph, fp32 or int8) and `embedder`
joins the two.
"""

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from backend.embedding.models import ModelSpec

if TYPE_CHECKING:
    import torch

    from backend.embedding.quantize import Calibration


class EmbeddingModel(ABC):
    """One row of the model table with its weights, input size and precision. Subclasses (one per family)
    name the weights and build the network; torch is imported only when a network is built or run."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights: str | None = None,
        image_size: int | None = None,
        precision: str = "fp32",
        calibration: "Calibration | None" = None,
    ) -> None:
        self.spec = spec
        self.name, self.dim = spec.name, spec.dim
        self.weights = weights
        self.image_size = image_size or spec.input_size
        self.precision = precision
        self.calibration = calibration

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
    def build_network(self) -> "torch.nn.Module":
        """The network with its weights loaded, on the CPU (raises ModelUnavailable when they cannot be had)."""

    @abstractmethod
    def features(self, network: "torch.nn.Module", batch: "torch.Tensor") -> "torch.Tensor":
        """(N, 3, S, S) input -> (N, dim) pooled features."""

    @abstractmethod
    def normalise_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> float32 model input scaling."""

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """RGB image -> (S, S, 3) uint8: the centred square of side min(w, h), resized to S x S.

        Only that box is resampled, straight to S x S, so memory is O(S^2) whatever the aspect ratio
        (scaling the short side up first made a 10,000 x 1 PNG of ~100 bytes cost gigabytes)."""
        s = self.image_size
        side = min(img.width, img.height)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        square = img.resize((s, s), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        return np.asarray(square, dtype=np.uint8)
