"""Embedding throughput per model (from the model table), batch size, input size, runtime and precision
(fp32 against int8 for the default model: issue 22's goal is int8 >= 1.8x fp32 at batch 32)."""

import sys

import numpy as np

from backend.core.config import Settings
from backend.core.embedding_models import DEFAULT_MODEL, MODELS
from backend.embedding.cache import model_cache
from backend.embedding.sessions import onnxruntime_available
from backend.imaging import decode_image
from benchmarks.harness import cifar_samples, throughput


def run(settings: Settings, quick: bool) -> list[dict]:
    runtime = "onnx" if onnxruntime_available() else "torch"
    int8 = "int8" if runtime == "onnx" else None  # int8 runs on ONNX Runtime only
    if quick:
        plan = [(DEFAULT_MODEL, None, 8, runtime, "fp32")]  # a smoke run: eager PyTorch alone took minutes loaded
        plan += [(DEFAULT_MODEL, None, 8, runtime, p) for p in (int8,) if p]
    else:
        plan = [(m, None, b, rt, "fp32") for rt in ("torch", runtime) for m in MODELS for b in (1, 8, 32)]
        plan += [(DEFAULT_MODEL, None, b, runtime, p) for p in (int8,) if p for b in (1, 8, 32)]
        plan += [(DEFAULT_MODEL, s, 32, runtime, "fp32") for s in (128, 160)]
    raw = [s.load() for s in cifar_samples(settings, 16 if quick else 96).samples]
    rows = []
    for name, size, batch, rt, precision in plan:
        # Pretrained ResNet weights cannot be fetched offline; random weights cost the same compute.
        model = model_cache.get(settings, name, image_size=size, runtime=rt, weights="random", precision=precision)
        model.load()
        n = 16 if quick else min(len(raw), max(2 * batch, 24 if MODELS[name].relative_cost > 2 else 48))
        pixels = np.stack([model.preprocess(decode_image(b, 10**7).rgb) for b in raw[:n]])
        model.embed_pixels(pixels, batch)  # warm-up: first runs allocate and tune
        least = 0.2 if quick else 1.0
        model_only = throughput(lambda m=model, p=pixels, b=batch: m.embed_pixels(p, b), n, least)
        decoded = lambda m=model, k=n, b=batch: m.embed([decode_image(x, 10**7).rgb for x in raw[:k]], b)  # noqa: E731
        with_decode = throughput(decoded, n, least)
        rows.append(
            {
                "model": model.model_id,
                "runtime": model.runtime,
                "precision": precision,
                "batch": batch,
                "input_px": model.image_size,
                "images_per_s": round(model_only, 1),
                "images_per_s_with_decode": round(with_decode, 1),
            }
        )
        print(
            f"  embed {model.model_id:<52} {rt:<5} batch {batch:>3}: {model_only:7.1f} img/s, {with_decode:7.1f} with decode",
            file=sys.stderr,
        )
    return rows
