"""The process's one cache of embedders: the server, its in-process worker and job chunks share a model's
loaded session instead of each loading its own (as Immich's machine-learning service keeps one model cache).
`model_cache` is the embedding package's only module-level mutable state."""

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from backend.core.config import Settings
from backend.embedding import quantize
from backend.embedding.embedder import Embedder, create_embedder

# One embedder per model id and runtime: what makes two embedders compute different things.
_IdKey = tuple[str, str, str, int, Path | None]


class ModelCache:
    """Embedders by model id (with runtime, device, batch size and ONNX cache directory), loaded on first use.

    Lookups go by the configuration that names the model, so a hit costs no model id: an int8 id hashes
    its calibration images. Configurations naming the same model id share one embedder. At most `capacity`
    embedders are held, the least recently used dropped first (a caller holding one keeps it working)."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._embedders: OrderedDict[_IdKey, Embedder] = OrderedDict()
        self._ids: dict[tuple, _IdKey] = {}  # configuration -> the id key it resolved to
        self._lock = threading.Lock()

    def get(
        self,
        settings: Settings,
        model_name: str | None = None,
        *,
        image_size: int | None = None,
        runtime: str | None = None,
        weights: str | None = None,
        precision: str | None = None,
    ) -> Embedder:
        """The settings' embedder (`create_embedder`'s arguments), shared; `load()` or the first embed loads it."""
        overrides: dict[str, Any] = {"image_size": image_size, "runtime": runtime, "weights": weights, "precision": precision}
        config = _configuration(settings, model_name, overrides)
        with self._lock:
            key = self._ids.get(config)
            if key is None or key not in self._embedders:
                embedder = create_embedder(settings, model_name, **overrides)
                key = (embedder.model_id, embedder.runtime, str(embedder.device), embedder.batch_size, embedder.onnx_dir)
                self._ids[config] = key
                self._embedders.setdefault(key, embedder)
            self._embedders.move_to_end(key)
            while len(self._embedders) > self.capacity:
                dropped, _ = self._embedders.popitem(last=False)
                self._ids = {c: k for c, k in self._ids.items() if k != dropped}
            return self._embedders[key]

    def clear(self) -> None:
        with self._lock:
            self._embedders.clear()
            self._ids.clear()


def _configuration(settings: Settings, model_name: str | None, overrides: dict[str, Any]) -> tuple:
    """Every setting `create_embedder` reads (calibration's included: the images an int8 id is hashed from)."""
    s = settings
    calibration = (quantize.calibration_dir(s), s.cifar10_dir, s.cache_dir, s.max_upload_size)
    return (
        model_name or s.model_name,
        (s.model_weights, s.image_size, s.embed_precision, s.embed_runtime, s.device, s.embed_batch_size, s.onnx_dir),
        calibration,
        tuple(sorted((k, v) for k, v in overrides.items() if v is not None)),
    )


model_cache = ModelCache()
