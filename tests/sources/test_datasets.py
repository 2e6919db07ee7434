"""Dataset loaders on the real CIFAR-10 subset and Fashion-MNIST, and category folders with junk."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.imaging import decode_image
from backend.sources.datasets import (
    DatasetUnavailable,
    balanced,
    load_dataset,
    load_fashion_mnist,
)
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
    from backend.sources.datasets import Sample

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


def test_folder_walk_never_leaves_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), "red").save(outside / "secret.png")
    root = tmp_path / "root"
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (8, 8), "orange").save(root / "cat" / "a.png")
    Image.new("RGB", (8, 8), "brown").save(root / "dog" / "b.png")
    (root / "cat" / "leak.png").symlink_to(outside / "secret.png")  # a file link out of the folder
    (root / "cat" / "sub" / "out").symlink_to(outside)  # a folder link out
    (root / "stolen").symlink_to(outside)  # a category that is a link out
    (root / "loop").symlink_to(".")  # a link loop at the top
    (root / "cat" / "sub" / "up").symlink_to("..")  # and one below
    (root / "dog" / "again.png").symlink_to(root / "cat" / "a.png")  # a link that stays inside: followed
    ds = load_dataset("folder", root, "all", None, make_settings(tmp_path))
    assert ds.categories == ["cat", "dog"]
    assert sorted(s.source for s in ds.samples) == ["cat/a.png", "dog/again.png", "dog/b.png"]  # relative
    assert all("secret" not in s.source and not s.source.startswith("/") for s in ds.samples)
    assert ds.skipped == 3 and all("outside the folder" in n for n in ds.notes)


def test_folder_names_in_any_encoding(tmp_path: Path) -> None:
    root = tmp_path / "root"
    os.makedirs(os.fsencode(root / "caf") + b"\xe9")  # a Latin-1 folder name: not UTF-8
    os.makedirs(root / "bird")
    (root / "\x07bell").mkdir()  # a control character: not a valid category name
    Image.new("RGB", (8, 8), "blue").save(root / "bird" / "ok.png")
    with open(os.fsencode(root / "bird") + b"/\xff\xfe.png", "wb") as f:
        Image.new("RGB", (8, 8), "blue").save(f, format="PNG")
    with open(os.fsencode(root / "caf") + b"\xe9/x.png", "wb") as f:
        Image.new("RGB", (8, 8), "green").save(f, format="PNG")
    Image.new("RGB", (8, 8), "green").save(root / "\x07bell" / "y.png")
    ds = load_dataset("folder", root, "all", None, make_settings(tmp_path))
    assert ds.categories == ["bird", "caf\ufffd"]
    assert sorted(s.source for s in ds.samples) == ["bird/ok.png", "bird/\ufffd\ufffd.png", "caf\ufffd/x.png"]
    for s in ds.samples:
        s.source.encode("utf-8")  # storable and printable
        assert s.load()[:4] == b"\x89PNG"
    assert ds.skipped == 1 and "control characters" in ds.notes[0]


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_idx_files() -> None:
    test = load_fashion_mnist(FASHION, "test")
    assert len(test) == 10_000
    img = decode_image(test[0].load(), 10**6)
    assert (img.width, img.height) == (28, 28) and test[0].label == "ankle boot"


def test_failed_cifar10_download_says_how_to_use_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import backend.sources.datasets as datasets

    monkeypatch.setattr(datasets, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    settings = make_settings(tmp_path).model_copy(update={"cifar10_dir": None})
    with pytest.raises(DatasetUnavailable, match=r"could not be downloaded.*CIFAR10_DIR"):
        datasets.find_cifar10(None, settings)
    assert not list((tmp_path / "cache").glob("*.tar.gz"))  # no half-downloaded archive left behind
