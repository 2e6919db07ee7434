"""Embedding throughput per model (from the model table), batch size, input size and runtime."""

import sys

import numpy as np

from backend.core.config import Settings
from backend.embedding.base import Embedder, onnxruntime_available
from backend.embedding.models import DEFAULT_MODEL, MODELS
from backend.embedding.registry import create_embedder
from backend.imaging import decode_image
from benchmarks.harness import cifar_samples, throughput


def run(settings: Settings, quick: bool) -> list[dict]:
    runtime = "onnx" if onnxruntime_available() else "torch"
    if quick:
        plan = [(DEFAULT_MODEL, None, 8, "torch"), (DEFAULT_MODEL, None, 8, runtime)]
    else:
        plan = [(m, None, b, rt) for rt in ("torch", runtime) for m in MODELS for b in (1, 8, 32)]
        plan += [(DEFAULT_MODEL, s, 32, runtime) for s in (128, 160)]
    raw = [s.load() for s in cifar_samples(settings, 64 if quick else 96).samples]
    rows = []
    cache: dict[tuple, Embedder] = {}
    for name, size, batch, rt in plan:
        # Pretrained ResNet weights cannot be fetched offline; random weights cost the same compute.
        key = (name, size, rt)
        model = cache.get(key) or create_embedder(settings, name, image_size=size, runtime=rt, weights="random")
        cache[key] = model
        model.batch_size = batch
        model.load()
        n = min(len(raw), max(2 * batch, 24 if MODELS[name].relative_cost > 2 else 48))
        pixels = np.stack([model.preprocess(decode_image(b, 10**7).rgb) for b in raw[:n]])
        model.embed_pixels(pixels)  # warm-up: first runs allocate and tune
        model_only = throughput(lambda m=model, p=pixels: m.embed_pixels(p), n)
        with_decode = throughput(lambda m=model, k=n: m.embed([decode_image(b, 10**7).rgb for b in raw[:k]]), n)
        rows.append(
            {
                "model": model.model_id,
                "runtime": model.runtime,
                "batch": batch,
                "input_px": model.image_size,
                "images_per_s": round(model_only, 1),
                "images_per_s_with_decode": round(with_decode, 1),
            }
        )
        print(
            f"  embed {model.model_id:<34} {rt:<5} batch {batch:>3}: {model_only:7.1f} img/s, {with_decode:7.1f} with decode",
            file=sys.stderr,
        )
    return rows
