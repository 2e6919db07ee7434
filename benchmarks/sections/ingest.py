"""Ingestion end to end (decode, embed, store, prototypes), pipelined and sequential, against embedding
alone, for fp32 and int8. Goals (issue 22): pipelined >= 0.9x embedding alone; >= 250 images/s with int8."""

import sys

from backend.core.config import Settings
from backend.core.embedding_models import DEFAULT_MODEL
from backend.embedding.cache import model_cache
from backend.embedding.sessions import onnxruntime_available
from backend.imaging import decode_image
from backend.ingest.populate import ingest
from benchmarks.harness import TempDatabase, cifar_samples, throughput

GOAL_RATIO = 0.9
GOAL_INT8_IMAGES_PER_S = 250.0


def run(settings: Settings, quick: bool) -> dict:
    dataset = cifar_samples(settings, 64 if quick else 640)
    images = [decode_image(s.load(), 10**7).rgb for s in dataset.samples]
    rows = []
    # --quick: fp32 only (the precision section runs int8)
    for precision in ("fp32", "int8") if onnxruntime_available() and not quick else ("fp32",):
        embedder = model_cache.get(settings, DEFAULT_MODEL, precision=precision)
        embedder.load()
        embedder.embed(images[:8])  # warm-up
        alone = throughput(lambda e=embedder: e.embed(images), len(images), 0.5 if quick else 2.0)
        row = {"precision": precision, "model": embedder.model_id, "embedding_alone_images_per_s": round(alone, 1)}
        for mode in ("pipelined",) if quick else ("sequential", "pipelined"):
            with TempDatabase() as db:
                report = ingest(dataset, embedder, db.engine, 10**7, progress=False, pipelined=mode == "pipelined")
            assert report.added == len(images), report
            row[f"{mode}_images_per_s"] = round(report.images_per_second, 1)
        row["pipelined_over_embedding_alone"] = round(row["pipelined_images_per_s"] / alone, 3)
        rows.append(row)
        print(
            f"  ingest {precision}: pipelined {row['pipelined_images_per_s']} img/s"
            + (f", sequential {row['sequential_images_per_s']}" if "sequential_images_per_s" in row else "")
            + f", embedding alone {alone:.1f}",
            file=sys.stderr,
        )
    return {"images": len(images), "rows": rows, "goal_ratio": GOAL_RATIO, "goal_int8_images_per_s": GOAL_INT8_IMAGES_PER_S}
