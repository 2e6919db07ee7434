"""The services one server holds, built once at start-up around its SearchService: what `api/deps.py` hands
to the routes, and the start, tick and stop of the server's background work; and the `worker` process's
start-up, the same job steps. The one start-up path for the API and the CLI."""

import logging
from dataclasses import dataclass

from sqlalchemy import Engine

from backend.core.config import Settings
from backend.core.memory import freeze_startup_objects, unfreeze_startup_objects
from backend.index.stage1_models import one_blas_thread
from backend.jobs import WorkerThread
from backend.services.catalogue import Catalogue
from backend.services.index_lifecycle import IndexLifecycle
from backend.services.jobs import Jobs
from backend.services.keys import Keys
from backend.services.search import SearchService
from backend.services.writes import CatalogueWrites

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    search: SearchService
    catalogue: Catalogue
    jobs: Jobs
    keys: Keys
    lifecycle: IndexLifecycle
    writes: CatalogueWrites
    worker: WorkerThread | None = None

    @classmethod
    def around(cls, search: SearchService) -> "Services":
        settings, engine, cache = search.settings, search.engine, search.cache
        lifecycle = IndexLifecycle(settings, engine, search.embedder, cache, search.stage1, lambda: search.stage2)
        return cls(
            settings,
            search,
            Catalogue(engine, lifecycle, search.embed),
            Jobs(settings, engine),
            Keys(settings, engine),
            lifecycle,
            CatalogueWrites(engine, search.follow_write, search.model),
        )

    def start(self) -> None:
        """Load the model and the index before the first request; open the job queue; sweep the files of
        jobs that ended while we were down; start the in-process worker (SERVE_WORKER)."""
        one_blas_thread()
        self.lifecycle.load()
        self.catalogue.prepare_map()
        self.jobs.open_for_work()
        if self.settings.serve_worker:
            self.worker = self.jobs.worker(self.search.follow_write)
            self.worker.start()
        freeze_startup_objects()  # before the first request, not during it

    def stop(self) -> None:
        unfreeze_startup_objects()  # what start-up froze may be collected again (a test's app, a stopped server)
        if self.worker is not None:
            self.worker.stop()
        self.jobs.close()
        self.search.close()
        try:
            self.lifecycle.save_index()  # the next start loads it and applies only later changes
        except OSError as exc:
            log.warning("index cache not saved: %s", exc)


def run_worker_process(settings: Settings, engine: Engine, concurrency: int) -> None:
    """The `worker` command: a server's job start-up (`Jobs.open_for_work`), staging that a crash on this
    machine interrupted resumed (in threads) beside the chunks, then chunks until SIGINT/SIGTERM."""
    jobs = Jobs(settings, engine)
    jobs.open_for_work()
    try:
        jobs.resume_staging()
        jobs.run_worker(concurrency)
    finally:
        jobs.close()
