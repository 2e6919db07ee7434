"""Builds the embedder named by MODEL_NAME (or another one from `models.MODELS`)."""

from backend.core.config import Settings
from backend.core.errors import ConfigurationError
from backend.embedding import quantize
from backend.embedding.base import Embedder
from backend.embedding.efficientnet import EfficientNetLiteEmbedder
from backend.embedding.models import MODEL_NAMES, MODELS
from backend.embedding.torchvision_models import ResNetEmbedder

FAMILIES: dict[str, type[Embedder]] = {"efficientnet_lite": EfficientNetLiteEmbedder, "resnet": ResNetEmbedder}


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
    """The settings' embedder; keyword arguments override single settings (evaluation, benchmarks)."""
    name = model_name or settings.model_name
    spec = MODELS.get(name)
    if spec is None:
        raise ConfigurationError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return FAMILIES[spec.family](
        spec=spec,
        weights=weights or settings.model_weights,
        image_size=image_size or settings.image_size,
        device=settings.device,
        batch_size=batch_size or settings.embed_batch_size,
        runtime=runtime or settings.embed_runtime,
        onnx_dir=settings.onnx_dir,
        precision=precision or settings.embed_precision,
        calibration=quantize.calibration_for(settings),
    )
