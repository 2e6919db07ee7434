"""Builds the embedder named by MODEL_NAME."""

from backend.core.config import Settings
from backend.core.errors import ConfigurationError
from backend.embedding.base import Embedder
from backend.embedding.efficientnet import EfficientNetLiteEmbedder
from backend.embedding.torchvision_models import ResNetEmbedder

MODEL_NAMES = ("efficientnet_lite0", "efficientnet_lite2", "resnet18", "resnet50")


def create_embedder(settings: Settings, model_name: str | None = None) -> Embedder:
    name = model_name or settings.model_name
    args = (settings.image_size, settings.device, settings.embed_batch_size)
    runtime = {"runtime": settings.embed_runtime, "onnx_dir": settings.cache_dir / "onnx"}
    if name in ("efficientnet_lite0", "efficientnet_lite2"):
        return EfficientNetLiteEmbedder(name, *args, **runtime)
    if name in ("resnet18", "resnet50"):
        return ResNetEmbedder(name, settings.model_weights, *args, **runtime)
    raise ConfigurationError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
