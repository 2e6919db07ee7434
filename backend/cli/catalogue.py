"""The catalogue's commands: init-db, populate, build-index, rebuild-prototypes, status, backup, restore."""

import argparse
import sys
from pathlib import Path

from backend.cli.argtypes import int_in
from backend.cli.common import Command, open_services, require_schema
from backend.core.config import Settings
from backend.core.errors import AppError
from backend.sources.datasets import DATASETS


def cmd_init_db(args: argparse.Namespace, settings: Settings) -> None:
    from backend.storage import migrate
    from backend.storage.engine import get_engine, location

    engine = get_engine()
    revision = migrate.upgrade(engine)
    print(f"database ready at schema revision {revision} ({location(settings, engine)})")


def cmd_populate(args: argparse.Namespace, settings: Settings) -> None:
    from backend.embedding import quantize
    from backend.embedding.cache import model_cache
    from backend.ingest.populate import ingest
    from backend.sources.datasets import balanced, load_dataset
    from backend.storage.engine import get_engine

    require_schema()
    dataset = load_dataset(args.dataset, args.source, args.split, args.num_images, settings)
    if args.background:  # a catalogue job: any worker (serve's own, `worker` processes) embeds it
        _populate_in_background(args, settings)
        return
    quantize.keep_calibration(settings, balanced(dataset.samples, quantize.CALIBRATION_IMAGES))  # int8: on these images
    embedder = model_cache.get(settings)
    report = ingest(
        dataset, embedder, get_engine(), settings.max_image_pixels, batch_size=args.batch_size, progress=not args.quiet
    )
    print(
        f"{report.added} images added, {report.duplicates} already stored, {report.failed} unreadable, "
        f"{report.skipped} files skipped; {report.images_per_second:.1f} images/s ({embedder.model_id})"
    )
    for line in [*dataset.notes, *(f["reason"] for f in report.failures)]:
        print(f"  skipped: {line}", file=sys.stderr)


def _populate_in_background(args: argparse.Namespace, settings: Settings) -> None:
    from backend.embedding.registry import model_id
    from backend.services.jobs import Jobs
    from backend.storage.engine import get_engine

    jobs = Jobs(settings, get_engine())
    params = {"dataset": args.dataset, "split": args.split, "num_images": args.num_images}
    job_id = jobs.create("dataset", model_id(settings), params | {"source": args.source and str(args.source)}, None)
    jobs.open()
    try:
        staged = jobs.stage_now(job_id)
    finally:
        jobs.close()
    print(f"job {job_id}: {staged.total} images in {staged.chunks} chunks queued; follow it with: jobs show {job_id}")


def cmd_build_index(args: argparse.Namespace, settings: Settings) -> None:
    lifecycle = open_services(settings).lifecycle
    index = lifecycle.rebuild_index("requested by build-index")
    print(
        f"index for {lifecycle.model}: {index.ntotal} vectors in {len(index.category_ids)} categories, {lifecycle.index_origin}"
    )
    print(f"stage 1: {lifecycle.stage1.ranker} (STAGE1={settings.stage1}; {lifecycle.stage1.reason})")


def cmd_rebuild_prototypes(args: argparse.Namespace, settings: Settings) -> None:
    services = open_services(settings)
    print(f"{services.writes.rebuild_prototypes()} prototypes recomputed for {services.search.model}")


def cmd_status(args: argparse.Namespace, settings: Settings) -> None:
    lifecycle = open_services(settings).lifecycle
    lifecycle.sync_index()  # loads the verified cache and applies later changes, or rebuilds from the database
    status = lifecycle.status()
    if args.json:
        print(status.model_dump_json())
        return
    db, idx = status.database, status.index
    print(f"database  {db.server}")
    print(f"model     {status.model.id} on {status.model.device}")
    print(f"images    {db.images} ({db.vectors_for_model} with {status.model.id} vectors)")
    print(f"index     {idx.type} ({idx.why}): {idx.vectors} vectors, {'current' if idx.current else 'stale'} ({idx.origin})")
    rerank = f" re-ranked from {idx.rerank}" if idx.rerank != "none" else ""
    print(
        f"          {idx.codec} codec{rerank}, {idx.lists} lists, nprobe {idx.default_nprobe}, {idx.memory_bytes / 2**20:.1f} MiB"
    )
    for reason in idx.retrain:
        print(f"          retrain on the next build-index: {reason}")
    print(f"stage 1   {status.stage1.ranker} (STAGE1={status.stage1.setting}): {status.stage1.reason}")
    for cat in db.categories:
        print(f"  {cat.name:<20} {cat.images:>7} images ({cat.labelled} labelled)")


def cmd_backup(args: argparse.Namespace, settings: Settings) -> None:
    from backend.storage.backup import backup
    from backend.storage.engine import get_engine

    require_schema()
    size = backup(get_engine(), args.file)
    print(f"backup written to {args.file} ({size / 1e6:.1f} MB, pg_dump custom format)")


def cmd_restore(args: argparse.Namespace, settings: Settings) -> None:
    from backend.storage.backup import restore
    from backend.storage.engine import get_engine, location

    engine = get_engine()
    where = location(settings, engine)
    if not args.yes:
        if not sys.stdin.isatty():
            raise AppError(f"restore replaces every image, key and vector in {where}: pass --yes to confirm")
        if input(f"Replace the whole catalogue in {where} with {args.file}? Type yes: ").strip() != "yes":
            raise AppError("restore cancelled")
    restore(engine, args.file)
    print(f"restored {args.file} into {where}; index caches will be rebuilt from it (stop running servers first)")


def add_catalogue_commands(command: Command) -> None:
    command("init-db", cmd_init_db, "create or upgrade the database schema (alembic upgrade head)")

    p = command("populate", cmd_populate, "embed and store a labelled dataset")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--source", type=Path, help="local dataset folder (CIFAR10_DIR / FASHION_MNIST_DIR by default)")
    p.add_argument("--split", choices=("train", "test", "all"), default="train")
    p.add_argument("--num-images", type=int_in(1), help="at most N images, balanced over categories")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=128, help="images per transaction")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--background", action="store_true", help="queue a catalogue job for the workers and return")

    command("build-index", cmd_build_index, "rebuild the FAISS index from the stored vectors")
    command("rebuild-prototypes", cmd_rebuild_prototypes, "recompute category prototypes from stored vectors")


def add_status_command(command: Command) -> None:
    p = command("status", cmd_status, "catalogue, model and index state")
    p.add_argument("--json", action="store_true")


def add_backup_commands(command: Command) -> None:
    p = command("backup", cmd_backup, "write the whole database to FILE (pg_dump custom format)")
    p.add_argument("file", type=Path)
    p = command("restore", cmd_restore, "replace the whole database with a backup FILE (stop servers first)")
    p.add_argument("file", type=Path)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
