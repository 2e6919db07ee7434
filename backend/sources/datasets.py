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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from backend.core.config import Settings
from backend.core.errors import InvalidInput
from backend.core.text import clean_name, decode_filename
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
    skipped: int = 0  # files left out of a folder dataset: not images, too large, links outside, bad names
    notes: list[str] = field(default_factory=list)  # why, for the first few

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


class _FolderWalk:
    """`root/<category>/**/<image>`, never leaving `root`: every link is resolved and followed only when it
    stays inside; each real directory is visited once, so link loops end; names in any encoding."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.real_root, self.max_bytes = root, root.resolve(), max_bytes
        self.samples: list[Sample] = []
        self.skipped = 0
        self.notes: list[str] = []
        self._seen: set[Path] = {self.real_root}

    def skip(self, relative: str, why: str) -> None:
        self.skipped += 1
        if len(self.notes) < 20:
            self.notes.append(f"{relative}: {why}")

    def _inside(self, path: Path, relative: str) -> Path | None:
        real = path.resolve()
        if real != self.real_root and self.real_root not in real.parents:
            self.skip(relative, "link to a place outside the folder, not followed")
            return None
        return real

    def categories(self) -> None:
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # top-level files and hidden folders are not categories
            shown = decode_filename(entry.name)
            real = self._inside(entry, shown)
            if real is None or real in self._seen:
                continue  # outside, or a link back to the root or to a folder already read
            try:
                label = clean_name(shown, "category folder name")
            except ValueError as exc:
                self.skip(shown, str(exc))
                continue
            self._seen.add(real)
            self._files(label, entry, shown)

    def _files(self, label: str, directory: Path, relative: str) -> None:
        for entry in sorted(directory.iterdir()):
            shown = f"{relative}/{decode_filename(entry.name)}"
            if entry.name.startswith("."):
                continue
            real = self._inside(entry, shown)
            if real is None:
                continue
            if real.is_dir():
                if real not in self._seen:
                    self._seen.add(real)
                    self._files(label, entry, shown)
            elif not real.is_file():
                continue  # sockets, fifos, dangling links
            elif real.suffix.lower() not in IMAGE_SUFFIXES and entry.suffix.lower() not in IMAGE_SUFFIXES:
                self.skip(shown, "not an image file name")
            elif real.stat().st_size > self.max_bytes:
                self.skip(shown, f"larger than MAX_UPLOAD_SIZE ({self.max_bytes:,} bytes)")
            else:
                self.samples.append(Sample(label, shown, real.read_bytes))


def load_folder(root: Path, max_bytes: int) -> tuple[list[Sample], int, list[str]]:
    """Samples of `root/<category>/**/<image>` with sources relative to `root`; how many files were
    skipped, and why (the first few)."""
    if not root.is_dir():
        raise DatasetUnavailable(f"folder not found: {root}")
    walk = _FolderWalk(root, max_bytes)
    walk.categories()
    if not walk.samples:
        raise DatasetUnavailable(f"no images found under {root} (expected {root}/<category>/<image files>)")
    return walk.samples, walk.skipped, walk.notes


def load_dataset(name: str, source: Path | None, split: Split, num_images: int | None, settings: Settings) -> Dataset:
    skipped, notes = 0, list[str]()
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
        samples, skipped, notes = load_folder(source, settings.max_upload_size)
    else:
        raise InvalidInput(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return Dataset(name, balanced(samples, num_images), skipped, notes)
