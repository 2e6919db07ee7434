"""EMBED_PRECISION=int8: the real Lite0 graph quantized on real CIFAR-10 images, against fp32."""

import json

import numpy as np
import pytest

from backend.core.errors import ConfigurationError
from backend.embedding import quantize
from backend.embedding.embedder import create_embedder
from backend.embedding.registry import model_id
from backend.evaluation.precision import compare
from backend.evaluation.retrieval import Embedded
from backend.imaging import decode_image
from backend.sources.datasets import balanced
from tests.utils.settings import make_settings

# Measured on the CIFAR-10 subset (evaluate --compare-int8, 5085 catalogue images, 1017 queries): query
# cosine int8/fp32 mean 0.984, min 0.834; P@10 0.7577 against fp32's 0.7574. The bounds leave room for the
# smaller sample here.
COSINE_MEAN_MIN = 0.97
COSINE_MIN = 0.75
P10_MARGIN = 0.03


@pytest.fixture(scope="module")
def int8_embedder(embedder, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("int8"), onnx_cache_dir=embedder.onnx_dir)
    model = create_embedder(settings, precision="int8", runtime="onnx", batch_size=32)
    model.load()
    return model


def _embedded(model, dataset) -> Embedded:
    names = dataset.categories
    vectors = model.embed([decode_image(s.load(), 10**7).rgb for s in dataset.samples])
    return Embedded(vectors, np.array([names.index(s.label) for s in dataset.samples]), names)


def test_int8_has_its_own_model_id_and_recorded_calibration(embedder, int8_embedder, tmp_path) -> None:
    digest = int8_embedder.calibration.digest
    assert int8_embedder.model_id == f"{embedder.model_id}/int8-{digest}"
    assert model_id(make_settings(tmp_path), precision="int8") == int8_embedder.model_id  # known without a graph
    graph = embedder.onnx_dir / f"efficientnet_lite0_imagenet_224px.int8-{digest}.onnx"
    assert graph.is_file()
    record = json.loads(graph.with_suffix(".calibration.json").read_text())
    assert len(record["images"]) == quantize.CALIBRATION_IMAGES
    assert all(src.startswith("cifar10:data_batch") for src, _ in record["images"])  # train split, never queries


def test_int8_vectors_and_precision_stay_close_to_fp32(embedder, int8_embedder, cifar_train, cifar_queries) -> None:
    runs = {
        "fp32": (_embedded(embedder, cifar_train), _embedded(embedder, cifar_queries)),
        "int8": (_embedded(int8_embedder, cifar_train), _embedded(int8_embedder, cifar_queries)),
    }
    np.testing.assert_allclose(np.linalg.norm(runs["int8"][1].vectors, axis=1), 1, atol=1e-5)
    report = compare(runs, {"fp32": embedder.model_id, "int8": int8_embedder.model_id})
    assert report["query_cosine_mean"] > COSINE_MEAN_MIN and report["query_cosine_min"] > COSINE_MIN
    fp32, int8 = report["precisions"]["fp32"], report["precisions"]["int8"]
    assert abs(int8["precision@10"] - fp32["precision@10"]) < P10_MARGIN
    assert fp32["precision@10"] > 0.5  # both are real retrieval, not noise
    assert 0.5 < report["top10_overlap"] <= 1.0


def test_int8_needs_the_onnx_runtime(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="EMBED_PRECISION=int8 needs the ONNX runtime"):
        create_embedder(make_settings(tmp_path), precision="int8", runtime="torch")


def test_slow_int8_is_said_not_hidden() -> None:
    warning = quantize.speed_warning(1.05)
    if quantize.int8_cpu():
        assert warning is not None and "1.05x" in warning
        assert quantize.speed_warning(1.9) is None
    else:
        assert warning is not None and "no 8-bit dot-product" in warning


def test_int8_without_calibration_images_says_what_to_set(tmp_path) -> None:
    settings = make_settings(tmp_path, embed_calibration_dir=tmp_path / "nowhere")
    model = create_embedder(settings, precision="int8", runtime="onnx")
    with pytest.raises(ConfigurationError, match="set EMBED_CALIBRATION_DIR"):
        model.model_id  # noqa: B018 - the calibration images name the model
    with pytest.raises(ConfigurationError, match="set EMBED_CALIBRATION_DIR"):
        model_id(settings, precision="int8")


def test_int8_calibrates_on_the_images_being_ingested(tmp_path, cifar_train) -> None:
    """`populate --source` with int8 and no EMBED_CALIBRATION_DIR keeps a spread sample of its own images in
    DATA_DIR/calibration: no CIFAR10_DIR is asked for, and a later run (or serve) names the same model id."""
    settings = make_settings(tmp_path, embed_precision="int8").model_copy(update={"cifar10_dir": tmp_path / "no-cifar"})
    samples = cifar_train.samples
    assert quantize.keep_calibration(settings.model_copy(update={"embed_precision": "fp32"}), samples) is None
    kept = quantize.keep_calibration(settings, balanced(samples, quantize.CALIBRATION_IMAGES))
    assert kept == settings.data_dir / "calibration" and quantize.calibration_dir(settings) == kept
    files = sorted(kept.rglob("*.*"))
    assert len(files) == quantize.CALIBRATION_IMAGES
    assert {f.parent.name for f in files} == {s.label for s in samples}  # spread over every category
    assert {f.read_bytes() for f in files} <= {s.load() for s in samples}  # the ingested images, as they are
    calibration = quantize.calibration_for(settings)
    assert calibration.description == f"folder {kept}" and len(calibration.images) == quantize.CALIBRATION_IMAGES
    first = model_id(settings, precision="int8")
    assert quantize.keep_calibration(settings, samples[::-1]) is None  # fixed once kept
    assert model_id(settings, precision="int8") == first
