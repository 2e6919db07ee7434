"""The workers that run chunks: the `worker` command (a process of its own) and `serve`'s in-process worker
thread (SERVE_WORKER), which makes each committed chunk searchable in its server at once."""

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from backend.core.config import Settings
from backend.jobs.chunks import ChunkRunner
from backend.jobs.queue import worker_app, worker_options

log = logging.getLogger("backend.jobs")


def run_worker(settings: Settings, engine: Engine, concurrency: int) -> None:
    """Run chunks until stopped (SIGINT / SIGTERM): the `worker` command."""
    app = worker_app(engine)
    with app.open():
        runner = ChunkRunner(settings, engine)
        app.run_worker(**worker_options(runner, concurrency, f"imsrc-{threading.get_native_id()}", install_signal_handlers=True))


class WorkerThread:
    """`serve`'s in-process worker (SERVE_WORKER): procrastinate's worker on an event loop of its own thread,
    so that `./setup.sh all` needs no second process; stopped with the server."""

    def __init__(self, settings: Settings, engine: Engine, after_write: Callable[[], None] | None = None) -> None:
        self.runner = ChunkRunner(settings, engine, after_write)
        self.concurrency = settings.worker_concurrency
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="catalogue-worker", daemon=True)
        self.task: Any = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = worker_app(self.runner.engine)

        async def main() -> None:
            async with app.open_async():
                await app.run_worker_async(**worker_options(self.runner, self.concurrency, "imsrc-serve", False))

        self.task = self.loop.create_task(main())
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass  # stopped with the server
        except Exception as exc:  # the database went away for good, say
            log.warning("in-process worker stopped: %s", exc)
        finally:  # let the pool's own tasks finish before the loop goes
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.task is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout_s)
