"""Dataset loaders on the real CIFAR-10 subset and Fashion-MNIST, and category folders with junk."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.datasets import (
    DatasetUnavailable,
    balanced,
    load_dataset,
    load_fashion_mnist,
)
from backend.imaging import decode_image
from tests.utils.settings import CIFAR_SUBSET, make_settings

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_cifar10_subset_splits(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    train = load_dataset("cifar10", CIFAR_SUBSET, "train", None, settings)
    test = load_dataset("cifar10", CIFAR_SUBSET.parent, "test", None, settings)  # the parent folder works too
    assert (len(train.samples), len(test.samples)) == (5 * 1017, 1017)
    assert train.categories == sorted(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    img = decode_image(test.samples[0].load(), 10**6)
    assert (img.width, img.height, img.format) == (32, 32, "PNG")


def test_num_images_is_balanced(tmp_path: Path) -> None:
    ds = load_dataset("cifar10", CIFAR_SUBSET, "all", 205, make_settings(tmp_path))
    counts = np.unique([s.label for s in ds.samples], return_counts=True)[1]
    assert len(ds.samples) == 205 and counts.max() - counts.min() <= 1


def test_balanced_redistributes_small_categories() -> None:
    from backend.datasets import Sample

    samples = [Sample("rare", f"r{i}", bytes) for i in range(2)] + [Sample("common", f"c{i}", bytes) for i in range(50)]
    chosen = balanced(samples, 20)
    assert len(chosen) == 20 and sum(s.label == "rare" for s in chosen) == 2


def test_missing_dataset_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="no CIFAR-10 batches"):
        load_dataset("cifar10", tmp_path / "nowhere", "train", None, make_settings(tmp_path))
    with pytest.raises(DatasetUnavailable, match="folder not found"):
        load_dataset("folder", tmp_path / "nowhere", "train", None, make_settings(tmp_path))


def test_folder_tolerates_junk_at_any_depth(tmp_path: Path) -> None:
    root = tmp_path / "cats-and-dogs"
    for label, color in (("cat", "orange"), ("dog", "brown")):
        (root / label / "deep" / "er").mkdir(parents=True)
        Image.new("RGB", (10, 10), color).save(root / label / "a.png")
        Image.new("RGB", (10, 10), color).save(root / label / "deep" / "er" / "b.JPG", format="JPEG")
        (root / label / "notes.txt").write_text("not an image")
        (root / label / "deep" / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "README").write_text("top-level files are not categories")
    (root / ".hidden").mkdir()
    ds = load_dataset("folder", root, "all", None, make_settings(tmp_path))
    assert ds.categories == ["cat", "dog"] and ds.skipped == 2
    assert len(ds.samples) == 6  # the broken .png is found here and refused at decode time


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_idx_files() -> None:
    test = load_fashion_mnist(FASHION, "test")
    assert len(test) == 10_000
    img = decode_image(test[0].load(), 10**6)
    assert (img.width, img.height) == (28, 28) and test[0].label == "ankle boot"


def test_failed_cifar10_download_says_how_to_use_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import backend.datasets as datasets

    monkeypatch.setattr(datasets, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    settings = make_settings(tmp_path).model_copy(update={"cifar10_dir": None})
    with pytest.raises(DatasetUnavailable, match=r"could not be downloaded.*CIFAR10_DIR"):
        datasets.find_cifar10(None, settings)
    assert not list((tmp_path / "cache").glob("*.tar.gz"))  # no half-downloaded archive left behind
