"""Embedding models: the real pretrained Lite0, and the failure paths of the torchvision models."""

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from backend.core.embedding_models import MODEL_NAMES, MODELS
from backend.core.errors import ConfigurationError, ModelUnavailable
from backend.embedding.efficientnet import EfficientNetLiteModel
from backend.embedding.embedder import Embedder, create_embedder
from backend.embedding.registry import FAMILIES
from backend.embedding.torchvision_models import ResNetModel
from tests.utils.settings import make_settings


def test_lite0_vectors_are_normalised_deterministic_and_meaningful(embedder, cifar_queries) -> None:
    from backend.imaging import decode_image

    images = [decode_image(s.load(), 10**6).rgb for s in cifar_queries.samples[:12]]
    a = embedder.embed(images)
    b = embedder.embed(images[::-1])[::-1]
    assert a.shape == (12, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-4)  # batch order does not change a vector
    assert embedder.model_id == "efficientnet_lite0/imagenet/224px"


def test_onnx_runtime_matches_pytorch(embedder, cifar_queries) -> None:
    from backend.imaging import decode_image

    assert embedder.runtime == "onnx"
    torch_model = Embedder(EfficientNetLiteModel(MODELS["efficientnet_lite0"]), device="cpu", batch_size=8, runtime="torch")
    images = [decode_image(s.load(), 10**6).rgb for s in cifar_queries.samples[:16]]
    a, b = embedder.embed(images), torch_model.embed(images)
    assert torch_model.model_id == embedder.model_id
    assert np.abs(a - b).max() < 1e-4 and (a * b).sum(axis=1).min() > 0.99999


def test_any_size_and_mode_is_accepted(embedder) -> None:
    out = embedder.embed([Image.new("RGB", (500, 90), "red"), Image.new("RGB", (7, 300), "blue")])
    assert out.shape == (2, 1280)


def test_random_weights_are_recorded_in_model_id(tmp_path) -> None:
    model = Embedder(ResNetModel(MODELS["resnet18"], weights="random"), device="cpu", batch_size=4)
    assert model.model_id == "resnet18/random/224px"
    assert model.embed([Image.new("RGB", (64, 64), "green")]).shape == (1, 512)


def test_missing_weights_file_names_the_remedy(tmp_path) -> None:
    model = create_embedder(make_settings(tmp_path, model_name="resnet50", model_weights=str(tmp_path / "nope.pth")))
    with pytest.raises(ModelUnavailable, match="MODEL_WEIGHTS file not found"):
        model.load()


def test_unknown_model_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="unknown model"):
        create_embedder(make_settings(tmp_path), "vgg16")


def test_unknown_model_setting_is_refused_at_start_up(tmp_path) -> None:
    with pytest.raises(ValidationError, match="unknown model 'vgg16'"):
        make_settings(tmp_path, model_name="vgg16")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_in_the_table_builds_with_its_own_size_and_dimension(tmp_path, name: str) -> None:
    model = create_embedder(make_settings(tmp_path, model_name=name, model_weights="random"))
    spec = MODELS[name]
    assert isinstance(model.model, FAMILIES[spec.family]) and not model.loaded  # lazy: nothing loaded yet
    assert (model.name, model.dim, model.image_size) == (name, spec.dim, spec.input_size)
    assert model.model_id.startswith(f"{name}/") and model.model_id.endswith(f"/{spec.input_size}px")
