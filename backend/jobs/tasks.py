"""The queue's names, shared by the apps that run tasks (`queue`) and the code that defers them (`staging`)."""

from typing import Any

import procrastinate

QUEUE = "catalogue"
CHUNK_TASK = "imsrc.ingest_chunk"


def defer_chunk(queue: procrastinate.App, connection: Any, job_id: int, chunk: int) -> None:
    """Queue a chunk's task inside the caller's transaction (`connection`: the session's connection)."""
    queue.configure_task(CHUNK_TASK, connection=connection).defer(job_id=job_id, chunk=chunk)
