"""The model a configuration names (MODEL_NAME, or another row of `models.MODELS`) and its model id, known
without loading weights or a framework: a description only (`embedder` builds what runs it)."""

from backend.core.config import Settings
from backend.core.embedding_models import MODEL_NAMES, MODELS
from backend.core.errors import ConfigurationError
from backend.embedding import quantize
from backend.embedding.base import EmbeddingModel
from backend.embedding.efficientnet import EfficientNetLiteModel
from backend.embedding.torchvision_models import ResNetModel

FAMILIES: dict[str, type[EmbeddingModel]] = {"efficientnet_lite": EfficientNetLiteModel, "resnet": ResNetModel}


def describe(
    settings: Settings,
    model_name: str | None = None,
    *,
    image_size: int | None = None,
    weights: str | None = None,
    precision: str | None = None,
) -> EmbeddingModel:
    """The settings' model; keyword arguments override single settings (evaluation, benchmarks)."""
    name = model_name or settings.model_name
    spec = MODELS.get(name)
    if spec is None:
        raise ConfigurationError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return FAMILIES[spec.family](
        spec,
        weights=weights or settings.model_weights,
        image_size=image_size or settings.image_size,
        precision=precision or settings.embed_precision,
        calibration=quantize.calibration_for(settings),  # lazy: its images are read when int8 names its id
    )


def model_id(settings: Settings, model_name: str | None = None, *, precision: str | None = None) -> str:
    """The id the settings' model (or `model_name`) stores its vectors under. Cheap: no weights, no runtime
    (int8's id reads its calibration images, whose hash it contains)."""
    return describe(settings, model_name, precision=precision).model_id
