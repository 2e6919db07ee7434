"""What each kind of job stages, enumerated in a fixed order so that a resumed staging can skip what was
staged before a crash: an archive (extracted safely on this machine), a URL list, a folder on this
machine, a dataset, or the stored images a re-embedding still lacks."""

import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from backend.core.config import Settings
from backend.core.errors import InvalidInput
from backend.sources.datasets import Sample, load_dataset, load_folder
from backend.storage import catalogue
from backend.storage.engine import session_scope
from backend.storage.jobs import staged_image_ids
from backend.storage.schema import CatalogueJob, CatalogueJobItem


@dataclass
class Found:
    items: Iterator[CatalogueJobItem]
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)  # items that failed already (counted as failed)
    notes: list[dict] = field(default_factory=list)  # why entries were skipped (listed, counted as skipped)


def enumerate_input(settings: Settings, engine: Engine, job: CatalogueJob) -> Found:
    """The job's items; InvalidInput (the job fails with its message) when its input is unusable or gone."""
    if job.kind == "reembed":
        return _reembed(engine, job)
    if job.kind == "folder":
        samples, skipped, skip_notes = _folder(Path(job.params.get("path", "")), settings)
        return Found(_sample_items(samples), skipped, notes=[{"source": "folder", "reason": n} for n in skip_notes])
    if job.kind == "dataset":
        p = job.params
        source = Path(p["source"]) if p.get("source") else None
        dataset = load_dataset(p["dataset"], source, p.get("split", "train"), p.get("num_images"), settings)
        notes = [{"source": p["dataset"], "reason": n} for n in dataset.notes]
        return Found(_sample_items(dataset.samples), dataset.skipped, notes=notes)
    path = _input(settings, job)
    return _archive(settings, job.id, path) if job.kind == "archive" else _urls(settings, path)


def job_dir(settings: Settings, job_id: int) -> Path:
    return settings.data_dir / "jobs" / str(job_id)


def input_path(settings: Settings, job_id: int) -> Path:
    """Where an uploaded archive or URL list waits until it is staged (written whole, then renamed here)."""
    return job_dir(settings, job_id) / "input"


def _input(settings: Settings, job: CatalogueJob) -> Path:
    path = input_path(settings, job.id)
    if not path.is_file():
        raise InvalidInput("the job's input is gone (the server stopped before it was saved): hand it over again")
    return path


def _sample_items(samples: Iterable[Sample]) -> Iterator[CatalogueJobItem]:
    """Items of files or dataset samples: their bytes are read now, on the machine that has them."""
    for sample in samples:
        yield CatalogueJobItem(source=sample.source, category=sample.label, data=sample.load())


def _folder(folder: Path, settings: Settings) -> tuple[list[Sample], int, list[str]]:
    if not folder.is_absolute() or not folder.is_dir():
        raise InvalidInput("the folder is not on this server (or no longer)")
    try:
        return load_folder(folder, settings.max_upload_size)
    except InvalidInput:  # its message names the server path: not for every reader of the job
        raise InvalidInput("no images in the folder (expected <category>/<image files>)") from None


def _archive(settings: Settings, job_id: int, archive: Path) -> Found:
    """Extract (again, after a crash: into a fresh folder) and walk the files like a folder."""
    from backend.sources.archives import Limits, extract_archive

    folder = archive.parent / "files"
    shutil.rmtree(folder, ignore_errors=True)
    limits = Limits(settings.max_archive_entries, settings.max_archive_expanded, settings.max_upload_size)
    extracted = extract_archive(archive, folder, limits)
    try:
        samples, skipped, notes = load_folder(folder, settings.max_upload_size)
    except InvalidInput:
        samples, skipped, notes = [], 0, []
    failures = [{"source": name, "reason": why} for name, why in extracted.failures]
    listed = [{"source": "archive", "reason": note} for note in extracted.notes + notes]
    return Found(_sample_items(samples), extracted.skipped + skipped, failures, listed)


def _urls(settings: Settings, path: Path) -> Found:
    from backend.sources.urls import parse_url_list, shown

    items, problems = parse_url_list(path.read_text(encoding="utf-8"), settings.max_url_list_items)
    staged = (CatalogueJobItem(source=shown(i.url), url=i.url, category=i.category, description=i.description) for i in items)
    return Found(staged, failures=[{"source": "URL list", "reason": p} for p in problems])


def _reembed(engine: Engine, job: CatalogueJob) -> Found:
    """Every stored image without the job's model's embedding and not staged already, by id: workers read
    its bytes from the database."""
    with session_scope(engine) as session:
        staged = staged_image_ids(session, job.id)
        ids = [i for i in catalogue.images_without(session, job.model) if i not in staged]
    return Found(CatalogueJobItem(source=f"image {i}", image_id=i) for i in ids)
