"""Safe archive extraction with real CIFAR-10 images: a good archive becomes a `<category>/<images>` folder;
zip-slip paths, links, devices and zip bombs never write outside the folder or past the caps."""

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from backend.sources.archives import ArchiveRejected, Limits, extract_archive
from backend.sources.datasets import load_cifar10, load_folder
from tests.utils.images import png
from tests.utils.settings import CIFAR_SUBSET


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes]]:
    samples = load_cifar10(CIFAR_SUBSET, "test")[:30]
    return [(s.label, s.load()) for s in samples]


def make_zip(path: Path, entries: list[tuple[str, bytes]], links: list[tuple[str, str]] = ()) -> Path:  # type: ignore[assignment]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
        for name, target in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def test_a_good_zip_becomes_a_category_folder(tmp_path: Path, images) -> None:
    archive = make_zip(tmp_path / "a.zip", [(f"{label}/img{i}.png", data) for i, (label, data) in enumerate(images)])
    report = extract_archive(archive, tmp_path / "out")
    assert (report.files, report.skipped) == (30, 0)
    samples, skipped, _ = load_folder(tmp_path / "out", 10**7)
    assert len(samples) == 30 and skipped == 0
    assert sorted(s.label for s in samples) == sorted(label for label, _ in images)
    assert {s.load() for s in samples} == {data for _, data in images}


def test_a_good_tar_gz_with_nested_folders(tmp_path: Path, images) -> None:
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for i, (label, data) in enumerate(images[:5]):
            info = tarfile.TarInfo(f"./{label}/deeper/img{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    report = extract_archive(archive, tmp_path / "out")
    assert report.files == 5 and len(load_folder(tmp_path / "out", 10**7)[0]) == 5


def test_zip_slip_absolute_paths_and_links_are_skipped(tmp_path: Path, images) -> None:
    label, data = images[0]
    archive = make_zip(
        tmp_path / "evil.zip",
        [
            ("../escaped.png", data),
            ("cat/../../escaped2.png", data),
            ("/tmp/absolute.png", data),
            ("C:/windows.png", data),
            ("loose.png", data),  # not in a category folder
            (f"{label}/kept.png", data),
        ],
        links=[(f"{label}/link.png", "/etc/passwd")],
    )
    report = extract_archive(archive, tmp_path / "out")
    assert (report.files, report.skipped) == (1, 6)
    assert not (tmp_path / "escaped.png").exists() and not Path("/tmp/absolute.png").exists()
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == ["kept.png"]
    assert any("leaves" in n for n in report.notes) and any("link" in n for n in report.notes)


def test_tar_links_devices_and_escapes_are_skipped(tmp_path: Path, images) -> None:
    label, data = images[0]
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        for name, kind in [
            (f"{label}/sym.png", tarfile.SYMTYPE),
            (f"{label}/hard.png", tarfile.LNKTYPE),
            (f"{label}/dev", tarfile.CHRTYPE),
            (f"{label}/fifo", tarfile.FIFOTYPE),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tf.addfile(info)
        for name in ("../up.png", f"{label}/ok.png"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    report = extract_archive(archive, tmp_path / "out")
    assert (report.files, report.skipped) == (1, 5)
    assert not (tmp_path / "up.png").exists()


def test_a_zip_bomb_stops_at_the_cap_and_leaves_nothing(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bomb.zip", [(f"cat/zeros{i}.png", b"\0" * (20 * 2**20)) for i in range(4)])
    assert archive.stat().st_size < 1 * 2**20  # 80 MB of zeros in well under 1 MB
    with pytest.raises(ArchiveRejected, match="more than"):
        extract_archive(archive, tmp_path / "out", Limits(max_total_bytes=30 * 2**20, max_file_bytes=50 * 2**20))
    assert not (tmp_path / "out").exists()
    # A file over the per-file cap is skipped, the rest kept.
    report = extract_archive(archive, tmp_path / "out2", Limits(max_file_bytes=2**20))
    assert (report.files, report.skipped) == (0, 4)
    assert not any((tmp_path / "out2").rglob("*.png"))


def test_too_many_entries_and_not_an_archive_are_rejected(tmp_path: Path) -> None:
    small = png(Image.new("RGB", (4, 4)))
    archive = make_zip(tmp_path / "many.zip", [(f"cat/{i}.png", small) for i in range(20)])
    with pytest.raises(ArchiveRejected, match="more than 10 entries"):
        extract_archive(archive, tmp_path / "out", Limits(max_entries=10))
    text = tmp_path / "list.zip"
    text.write_text("just text, named like an archive")
    with pytest.raises(ArchiveRejected, match=r"not a \.zip"):
        extract_archive(text, tmp_path / "out3")
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(archive.read_bytes()[:-40])
    with pytest.raises(ArchiveRejected):
        extract_archive(truncated, tmp_path / "out4")
