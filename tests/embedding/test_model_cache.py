"""Model ids known without weights or a framework, and the process's one cache of embedders."""

import subprocess
import sys
import threading

import pytest

from backend.core.config import PROJECT_ROOT
from backend.core.embedding_models import MODEL_NAMES
from backend.embedding.cache import ModelCache, model_cache
from backend.embedding.embedder import create_embedder
from backend.embedding.registry import model_id
from backend.jobs.chunks import ChunkRunner
from tests.utils.settings import make_settings

# The ids vectors are stored under: they must never change (the database keys vectors by them).
STORED_IDS = {
    "efficientnet_lite0": "efficientnet_lite0/imagenet/224px",
    "efficientnet_lite2": "efficientnet_lite2/imagenet/260px",
    "resnet18": "resnet18/imagenet1k/224px",
    "resnet50": "resnet50/imagenet1k/224px",
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_id_is_the_embedders_and_never_changes(tmp_path, name: str) -> None:
    settings = make_settings(tmp_path)
    assert model_id(settings, name) == create_embedder(settings, name).model_id == STORED_IDS[name]


def test_model_id_follows_the_settings(tmp_path) -> None:
    assert model_id(make_settings(tmp_path, model_name="resnet18", model_weights="random")) == "resnet18/random/224px"
    assert model_id(make_settings(tmp_path, image_size=160)) == "efficientnet_lite0/imagenet/160px"
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not really weights")
    assert model_id(make_settings(tmp_path, model_name="resnet50", model_weights=str(weights))).startswith("resnet50/file-")


def test_model_id_loads_no_framework() -> None:
    code = (
        "import sys; from backend.embedding.registry import model_id; from tests.utils.settings import make_settings; "
        "import tempfile, pathlib; print(model_id(make_settings(pathlib.Path(tempfile.mkdtemp())))); "
        "print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["efficientnet_lite0/imagenet/224px", "False False"]


def test_one_embedder_per_model_id(tmp_path) -> None:
    cache, settings = ModelCache(), make_settings(tmp_path)
    first = cache.get(settings)
    assert cache.get(settings) is first and not first.loaded  # loads on first use, not on lookup
    assert cache.get(settings, "efficientnet_lite0") is first  # another configuration, the same model id
    assert cache.get(make_settings(tmp_path / "elsewhere", onnx_cache_dir=settings.onnx_dir)) is first
    assert cache.get(settings, image_size=160) is not first and cache.get(settings, "resnet18") is not first
    assert cache.get(settings, runtime="torch") is not first  # another runtime: vectors equal, sessions not


def test_concurrent_lookups_share_one_embedder(tmp_path) -> None:
    cache, settings = ModelCache(), make_settings(tmp_path)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(settings))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(e is got[0] for e in got)


def test_the_least_recently_used_model_leaves_a_full_cache(tmp_path) -> None:
    cache, settings = ModelCache(capacity=2), make_settings(tmp_path)
    lite0, lite2 = cache.get(settings), cache.get(settings, "efficientnet_lite2")
    assert cache.get(settings) is lite0  # lite0 used last: lite2 leaves first
    cache.get(settings, "resnet18", weights="random")
    assert cache.get(settings) is lite0 and cache.get(settings, "efficientnet_lite2") is not lite2


def test_a_worker_shares_the_servers_model(embedder, tmp_path) -> None:
    settings = make_settings(tmp_path, onnx_cache_dir=embedder.onnx_dir)  # the graph is exported already
    runner = ChunkRunner(settings, engine=None)  # type: ignore[arg-type] - no chunk runs here
    assert runner.embedder() is model_cache.get(settings) and runner.embedder().loaded
    assert runner.embedder("efficientnet_lite0") is runner.embedder()
