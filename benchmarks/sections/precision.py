"""int8 against fp32 embedding (Lite0, ONNX Runtime) at batch 1, 8 and 32, measured in alternation so that
a neighbour's load on a shared machine falls on both alike. Goal (issue 22): int8 >= 1.8x fp32 at batch 32."""

import sys
import time
from collections.abc import Callable

import numpy as np

from backend.core.config import Settings
from backend.core.embedding_models import DEFAULT_MODEL
from backend.embedding import quantize
from backend.embedding.cache import model_cache
from backend.embedding.sessions import onnxruntime_available
from backend.imaging import decode_image
from benchmarks.harness import cifar_samples

GOAL = 1.8


def paired(runs: dict[str, Callable[[], object]], items: int, rounds: int) -> dict[str, float]:
    """Best items/s of each run over `rounds` rounds, the runs taking turns within each round."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            best[name] = max(best[name], items / (time.perf_counter() - t))
    return best


def run(settings: Settings, quick: bool) -> dict:
    if not onnxruntime_available():
        return {"skipped": "onnxruntime is not installed: int8 runs on ONNX Runtime only"}
    models = {p: model_cache.get(settings, DEFAULT_MODEL, precision=p) for p in ("fp32", "int8")}
    for m in models.values():
        m.load()
    raw = [s.load() for s in cifar_samples(settings, 32 if quick else 64).samples]
    pixels = np.stack([models["fp32"].preprocess(decode_image(b, 10**7).rgb) for b in raw])
    rows = []
    for batch in (8,) if quick else (1, 8, 32):
        n = min(len(pixels), max(2 * batch, 16))
        for m in models.values():
            m.embed_pixels(pixels[:n], batch)  # warm-up
        chunk = pixels[:n]
        speed = paired({p: lambda m=m, c=chunk, b=batch: m.embed_pixels(c, b) for p, m in models.items()}, n, 3 if quick else 8)
        rows.append(
            {
                "batch": batch,
                **{f"{p}_images_per_s": round(v, 1) for p, v in speed.items()},
                "ratio": speed["int8"] / speed["fp32"],
            }
        )
        print(
            f"  precision batch {batch}: fp32 {speed['fp32']:.1f}, int8 {speed['int8']:.1f} img/s (x{rows[-1]['ratio']:.2f})",
            file=sys.stderr,
        )
    at32 = next((r["ratio"] for r in rows if r["batch"] == 32), None)
    return {
        "int8_model": models["int8"].model_id,
        "rows": rows,
        "goal": GOAL,
        "met": None if at32 is None else at32 >= GOAL,
        "warning": quantize.speed_warning(at32),
    }
