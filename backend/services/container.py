"""The services one server holds, built once at start-up around its SearchService: what `api/deps.py` hands
to the routes, and the start, tick and stop of the server's background work."""

import logging
from dataclasses import dataclass

from backend.core.config import Settings
from backend.index.stage1_models import one_blas_thread
from backend.jobs import WorkerThread
from backend.services.catalogue import Catalogue
from backend.services.jobs import Jobs
from backend.services.keys import Keys
from backend.services.search import SearchService

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    search: SearchService
    catalogue: Catalogue
    jobs: Jobs
    keys: Keys
    worker: WorkerThread | None = None

    @classmethod
    def around(cls, search: SearchService) -> "Services":
        engine = search.engine
        return cls(search.settings, search, Catalogue(search), Jobs(search.settings, engine), Keys(search.settings, engine))

    def start(self) -> None:
        """Load the model and the index before the first request; open the job queue; sweep the files of
        jobs that ended while we were down; start the in-process worker (SERVE_WORKER)."""
        one_blas_thread()
        self.search.load()
        self.catalogue.prepare_map()
        self.jobs.open()
        self.jobs.sweep_files()
        if self.settings.serve_worker:
            self.worker = self.jobs.worker(self.search.cache)
            self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.jobs.close()
        try:
            self.search.save_index()  # the next start loads it and applies only later changes
        except OSError as exc:
            log.warning("index cache not saved: %s", exc)
