"""Labelled image sources: CIFAR-10 pickles, Fashion-MNIST idx files, and `<category>/<images>` folders.

Every loader returns `Sample`s in a deterministic order, so a rerun of an interrupted ingestion
sees the same images and skips the ones already stored.
"""

import functools
import gzip
import hashlib
import logging
import pickle
import shutil
import tarfile
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from backend.core.config import Settings
from backend.core.errors import InvalidInput
from backend.imaging import IMAGE_SUFFIXES, encode_png

log = logging.getLogger(__name__)

Split = Literal["train", "test", "all"]
DATASETS = ("cifar10", "fashion-mnist", "folder")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


class DatasetUnavailable(InvalidInput):
    pass


@dataclass(frozen=True)
class Sample:
    label: str
    source: str  # where it came from, e.g. "cifar10:test:17" or a file path
    load: Callable[[], bytes]  # original bytes; read lazily so large folders stream


@dataclass(frozen=True)
class Dataset:
    name: str
    samples: list[Sample]
    skipped: int = 0  # files that are not images (folder datasets)

    @property
    def categories(self) -> list[str]:
        return sorted({s.label for s in self.samples})


def balanced(samples: list[Sample], n: int | None) -> list[Sample]:
    """At most n samples, spread evenly over the labels (first ones of each label, stable order)."""
    if n is None or n >= len(samples):
        return samples
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    labels = sorted(by_label)
    quota = {label: n // len(labels) for label in labels}
    for label in labels[: n % len(labels)]:
        quota[label] += 1
    # Labels with too few samples give their unused quota to the others.
    spare = sum(max(0, quota[lb] - len(by_label[lb])) for lb in labels)
    while spare:
        growable = [lb for lb in labels if quota[lb] < len(by_label[lb])]
        if not growable:
            break
        for lb in growable[:spare]:
            quota[lb] += 1
            spare -= 1
    chosen = [s for lb in labels for s in by_label[lb][: quota[lb]]]
    order = {id(s): i for i, s in enumerate(samples)}
    return sorted(chosen, key=lambda s: order[id(s)])


def _array_samples(prefix: str, images: np.ndarray, labels: np.ndarray, names: list[str], offset: int = 0) -> list[Sample]:
    return [
        Sample(names[int(label)], f"{prefix}:{offset + i}", functools.partial(encode_png, img))
        for i, (img, label) in enumerate(zip(images, labels, strict=True))
    ]


# --- CIFAR-10 -------------------------------------------------------------------------------------


def _download_cifar10(dest: Path) -> Path:
    archive = dest / "cifar-10-python.tar.gz"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        log.info("downloading %s", CIFAR10_URL)
        with urllib.request.urlopen(CIFAR10_URL, timeout=30) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as exc:
        archive.unlink(missing_ok=True)
        raise DatasetUnavailable(
            f"CIFAR-10 could not be downloaded ({exc}); set CIFAR10_DIR (or --source) to a local "
            "cifar-10-batches-py folder, or use --dataset folder --source PATH"
        ) from exc
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != CIFAR10_MD5:
        archive.unlink()
        raise DatasetUnavailable(f"CIFAR-10 download is corrupt (md5 {digest}, expected {CIFAR10_MD5})")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    return dest / "cifar-10-batches-py"


def find_cifar10(source: Path | None, settings: Settings, download: bool = True) -> Path:
    candidates = [source] if source else [settings.cifar10_dir, settings.cache_dir / "cifar-10-batches-py"]
    for path in filter(None, candidates):
        for d in (path, path / "cifar-10-batches-py"):
            if (d / "batches.meta").is_file():
                return d
        if source or path == settings.cifar10_dir:
            raise DatasetUnavailable(f"no CIFAR-10 batches (batches.meta, data_batch_*) found in {path}")
    if not download:
        raise DatasetUnavailable("CIFAR-10 not found locally; set CIFAR10_DIR or --source")
    return _download_cifar10(settings.cache_dir)


def load_cifar10(directory: Path, split: Split) -> list[Sample]:
    with open(directory / "batches.meta", "rb") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    wanted = files["train"] + files["test"] if split == "all" else files[split]
    samples: list[Sample] = []
    for fname in wanted:
        path = directory / fname
        if not path.is_file():
            raise DatasetUnavailable(f"CIFAR-10 file missing: {path}")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        samples += _array_samples(f"cifar10:{fname}", images, np.asarray(batch[b"labels"]), names)
    return samples


# --- Fashion-MNIST --------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(directory: Path, split: Split) -> list[Sample]:
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    samples: list[Sample] = []
    for prefix in prefixes:
        paths = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            found = [directory / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
            path = next((p for p in found if p.is_file()), None)
            if path is None:
                raise DatasetUnavailable(
                    f"Fashion-MNIST file {prefix}-{kind}.gz not found in {directory} "
                    "(apt-get install dataset-fashion-mnist, or --source / FASHION_MNIST_DIR)"
                )
            paths.append(path)
        images, labels = _read_idx(paths[0]), _read_idx(paths[1])
        samples += _array_samples(f"fashion-mnist:{prefix}", images, labels, list(FASHION_MNIST_CLASSES))
    return samples


# --- category folders -----------------------------------------------------------------------------


def load_folder(root: Path) -> tuple[list[Sample], int]:
    """`root/<category>/**/<image>`; files that are not images by suffix are counted and skipped."""
    if not root.is_dir():
        raise DatasetUnavailable(f"folder not found: {root}")
    samples: list[Sample] = []
    skipped = 0
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(category_dir.rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(category_dir.name, str(path), path.read_bytes))
            else:
                skipped += 1
    if not samples:
        raise DatasetUnavailable(f"no images found under {root} (expected {root}/<category>/<image files>)")
    return samples, skipped


def load_dataset(name: str, source: Path | None, split: Split, num_images: int | None, settings: Settings) -> Dataset:
    skipped = 0
    if name == "cifar10":
        samples = load_cifar10(find_cifar10(source, settings), split)
    elif name == "fashion-mnist":
        directory = source or settings.fashion_mnist_dir
        if not directory.is_dir():
            raise DatasetUnavailable(
                f"Fashion-MNIST folder not found: {directory} "
                "(apt-get install dataset-fashion-mnist, or --source / FASHION_MNIST_DIR)"
            )
        samples = load_fashion_mnist(directory, split)
    elif name == "folder":
        if source is None:
            raise InvalidInput("--dataset folder needs --source PATH")
        samples, skipped = load_folder(source)
    else:
        raise InvalidInput(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return Dataset(name, balanced(samples, num_images), skipped)
