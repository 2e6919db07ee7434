"""Three overlapping stages for ingestion: decode (a thread pool), embed (the calling thread), write (one
writer thread), joined by bounded queues so that none runs more than `depth` batches ahead of the next.

Batches are written one at a time, in the order they came, each by one `write` call (one transaction):
a failure in any stage stops the pipeline: the batches before the failing one are written (whole), none
after it, and the failure is raised to the caller once the threads are done, so a rerun resumes after
the last written batch, as it would after the sequential loop.
Pillow and ONNX Runtime release the GIL while they work, so threads overlap for real.

Every batched ingestion runs on it with the stages of `backend.ingest.writer`: `populate` (one transaction per
batch, written by `write`) and a job chunk (its sub-batches decoded and embedded here, collected by `write`
and stored in the chunk's one transaction).
"""

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

B = TypeVar("B")  # a batch of work items
D = TypeVar("D")  # a decoded batch
E = TypeVar("E")  # an embedded batch, ready to write

DEFAULT_DECODERS = 2
DEFAULT_DEPTH = 2


class _Done:
    """Ends the writer's queue."""


class _Writer(Generic[E]):
    """The write stage: its own thread; after a failure it drains its queue without writing."""

    def __init__(self, write: Callable[[E], None], depth: int) -> None:
        self.write = write
        self.queue: queue.Queue[E | _Done] = queue.Queue(maxsize=depth)
        self.failed = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not isinstance(item := self.queue.get(), _Done):
            if self.failed.is_set():
                continue
            try:
                self.write(item)
            except BaseException as exc:  # re-raised in the caller's thread
                self.error = exc
                self.failed.set()

    def finish(self) -> None:
        self.queue.put(_Done())
        self.thread.join()


class _WriterFailed(Exception):
    pass


def run_pipeline(
    batches: Iterable[B],
    decode: Callable[[B], D],
    embed: Callable[[D], E],
    write: Callable[[E], None],
    *,
    decoders: int = DEFAULT_DECODERS,
    depth: int = DEFAULT_DEPTH,
) -> None:
    """decode(batch) in `decoders` threads, embed(decoded) here, write(embedded) in a writer thread, in
    order; at most `depth` batches wait between two stages. The first failure is raised after every
    thread has stopped; no batch after the failing one is written."""
    writer = _Writer(write, depth)
    pool = ThreadPoolExecutor(max(1, decoders), thread_name_prefix="ingest-decode")
    pending: deque[Future[D]] = deque()

    def embed_next() -> None:
        decoded = pending.popleft().result()  # a decoding error is raised here, in order
        if writer.failed.is_set():
            raise _WriterFailed
        embedded = embed(decoded)
        writer.queue.put(embedded)  # blocks while `depth` batches wait to be written

    error: BaseException | None = None
    try:
        for batch in batches:
            pending.append(pool.submit(decode, batch))
            if len(pending) > depth:
                embed_next()
        while pending:
            embed_next()
    except _WriterFailed:
        pass
    except BaseException as exc:  # raised below, once the threads are done
        error = exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.finish()  # writes what was queued before the failure: whole batches, all earlier ones
    if writer.error is not None:  # its batch came before any the other stages failed on
        raise writer.error
    if error is not None:
        raise error
