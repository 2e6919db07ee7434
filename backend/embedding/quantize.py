"""EMBED_PRECISION=int8: the exported fp32 graph, statically quantized (QDQ) and cached beside it.

What was measured on the project's Lite0 graph (issue 22) fixes the recipe: per-channel weights (per-tensor
scales collapse EfficientNet's depthwise convolutions, cosine 0.75), unsigned 8-bit activations with signed
8-bit weights (signed activations were slower), static calibration on real images (dynamic quantization was
3.5x slower than fp32). The calibration images are recorded (their sources and hashes, beside the graph) and
their hash names both the graph file and the vectors' model id: a different sample is a different model.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from backend.core.config import Settings
from backend.core.errors import ConfigurationError, InvalidInput
from backend.sources.datasets import load_dataset

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 100
# CPU features that make 8-bit convolutions fast in ONNX Runtime (x86: VNNI, AMX; ARM: dot product).
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
SLOW_SPEEDUP = 1.2  # below this measured int8/fp32 ratio, int8 is not worth its accuracy cost


# uint8 activations and uint8 weights: x86 CPUs without VNNI (AVX2 only, e.g. this project's AMD EPYC machines)
# saturate in ONNX Runtime's u8s8 kernels (measured: query cosine to fp32 0.86 with int8 weights, 0.93 with
# reduce_range, 0.97+ with uint8 weights), so one scheme that is right on every CPU.
QUANT_SCHEME = b"qdq-u8u8-per-channel"


@dataclass(frozen=True)
class Calibration:
    """A sample of real images to calibrate activation ranges on; `load` gives (source, bytes) pairs."""

    description: str
    load: Callable[[], list[tuple[str, bytes]]]

    @cached_property
    def images(self) -> list[tuple[str, bytes]]:
        return self.load()

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(QUANT_SCHEME)  # the scheme is part of the graph's identity: a new one, new vectors
        for _, data in self.images:
            h.update(hashlib.sha256(data).digest())
        return h.hexdigest()[:12]


def kept_calibration_dir(settings: Settings) -> Path:
    """Where `keep_calibration` leaves the sample it took from the first catalogue ingested into DATA_DIR."""
    return settings.data_dir / "calibration"


def calibration_dir(settings: Settings) -> Path | None:
    """The folder int8 calibrates on: EMBED_CALIBRATION_DIR, else the sample kept from the images ingested
    first (`keep_calibration`); None: CIFAR-10's train split."""
    if settings.embed_calibration_dir is not None:
        return settings.embed_calibration_dir
    kept = kept_calibration_dir(settings)
    return kept if kept.is_dir() else None


def keep_calibration(settings: Settings, samples: Sequence[Any]) -> Path | None:
    """For EMBED_PRECISION=int8 without EMBED_CALIBRATION_DIR: copy a sample of the images about to be
    ingested (`populate --source`; `samples` are datasets' Samples, spread over categories by the caller)
    into DATA_DIR/calibration once, so int8 calibrates on the catalogue's own images rather than asking for
    CIFAR-10. Later runs and `serve` on the same DATA_DIR find it, so they name the same model id. None when
    the calibration is fixed already (a set or kept folder) or there is nothing to take."""
    if settings.embed_precision != "int8" or calibration_dir(settings) is not None or not samples:
        return None
    folder = kept_calibration_dir(settings)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    for i, sample in enumerate(samples[:CALIBRATION_IMAGES]):
        label = "".join(c if c.isalnum() or c in "-_" else "_" for c in sample.label) or "none"
        (partial / label).mkdir(parents=True, exist_ok=True)
        (partial / label / f"{i:04d}{Path(sample.source).suffix.lower() or '.png'}").write_bytes(sample.load())
    try:
        partial.rename(folder)  # whole or not at all; a concurrent run that kept one first wins
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("int8 calibrates on %d of the images being ingested, kept in %s", min(len(samples), CALIBRATION_IMAGES), folder)
    return folder


def calibration_for(settings: Settings) -> Calibration:
    """The folder of `calibration_dir` (`<category>/<image>` folders, like catalogue imports), else CIFAR-10's
    train split (CIFAR10_DIR, or downloaded into DATA_DIR as `populate` does): CALIBRATION_IMAGES of them,
    spread over the categories."""
    folder = calibration_dir(settings)

    def load() -> list[tuple[str, bytes]]:
        try:
            if folder is not None:
                dataset = load_dataset("folder", folder, "all", CALIBRATION_IMAGES, settings)
            else:
                dataset = load_dataset("cifar10", None, "train", CALIBRATION_IMAGES, settings)
        except InvalidInput as exc:
            raise ConfigurationError(
                f"EMBED_PRECISION=int8 calibrates on real images, and none could be read: {exc.message} "
                "(set EMBED_CALIBRATION_DIR to <category>/<image> folders of about 100 catalogue images, "
                "or populate --source a folder first: its images are kept for calibration)"
            ) from exc
        return [(s.source, s.load()) for s in dataset.samples]

    return Calibration(f"folder {folder}" if folder else "CIFAR-10 train split", load)


def int8_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return any(flag in flags for flag in INT8_CPU_FLAGS)


def int8_path(fp32_path: Path, calibration: Calibration) -> Path:
    return fp32_path.with_name(f"{fp32_path.stem}.int8-{calibration.digest}.onnx")


def quantize(fp32_path: Path, calibration: Calibration, inputs: np.ndarray) -> Path:
    """The int8 graph for `fp32_path`, built once from `inputs` (N, 3, S, S) model inputs of `calibration`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = int8_path(fp32_path, calibration)
    if path.is_file():
        return path
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    prepared = path.with_suffix(f".{os.getpid()}.pre")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": inputs[i : i + 10]} for i in range(0, len(inputs), 10)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quiet = _DropRootRecords()  # onnxruntime's quantizer logs a line per adjusted scale to the root logger
    logging.getLogger().addFilter(quiet)
    log.info("quantizing %s to int8 on %d calibration images (%s)", fp32_path.name, len(inputs), calibration.description)
    try:
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference and folding: cleaner QDQ placement
        quantize_static(
            str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
        )  # fmt: skip
        record = {
            "calibration": calibration.description,
            "images": [[s, hashlib.sha256(d).hexdigest()] for s, d in calibration.images],
        }
        path.with_suffix(".calibration.json").write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)  # atomic: a concurrent process never reads a half-written graph
    finally:
        logging.getLogger().removeFilter(quiet)
        tmp.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    return path


class _DropRootRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def measured_speedup(fp32: Any, int8: Any, inputs: np.ndarray, repeats: int = 3) -> float:
    """int8 over fp32 images/s on `inputs` (best of `repeats` each, after a warm-up run)."""

    def best(session: Any) -> float:
        session.run(None, {"pixels": inputs})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            session.run(None, {"pixels": inputs})
            times.append(time.perf_counter() - t)
        return min(times)

    return best(fp32) / best(int8)


def speed_warning(speedup: float | None) -> str | None:
    """One line when int8 is not expected to pay for its accuracy cost here, else None."""
    if not int8_cpu():
        return (
            "EMBED_PRECISION=int8: this CPU has no 8-bit dot-product instructions (VNNI, AMX or dotprod): "
            "int8 may be no faster than fp32 here while costing accuracy"
        )
    if speedup is not None and speedup < SLOW_SPEEDUP:
        return f"EMBED_PRECISION=int8: measured only {speedup:.2f}x the fp32 speed here: fp32 is the better choice"
    return None
