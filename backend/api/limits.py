"""Bounded work per request, as pure ASGI middleware: a body size limit and a time budget.

Bodies are counted while they stream in, whatever the framing: a Content-Length over the limit is refused
before a byte is read, and a chunked body the moment it crosses the limit (Starlette spools multipart
files to disk, so counting only Content-Length let a chunked 300 MB body be written out in full).

A handler blocked in a worker thread cannot be interrupted, and cancelling the task that awaits it waits
for the thread. So the app runs in a task of its own: when the budget is spent before the response has
started, the client gets a 503 at once and whatever the abandoned task sends later is dropped. The thread
itself ends by its own deadlines (DB_TIMEOUT_SECONDS, bounded image work)."""

import asyncio
import logging

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.api.errors import RETRY_AFTER

log = logging.getLogger(__name__)


class BodyLimit:
    """`max_bytes` for every body, except the paths in `larger` (path -> (bytes, message)): archive uploads."""

    def __init__(self, app: ASGIApp, max_bytes: int, message: str, larger: dict[str, tuple[int, str]] | None = None) -> None:
        self.app, self.max_bytes, self.message, self.larger = app, max_bytes, message, larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, text = self.larger.get(scope["path"], (self.max_bytes, self.message))
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > max_bytes:
            await JSONResponse({"detail": text}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                # Raised inside the route's body parsing: FastAPI passes HTTPExceptions through to the
                # JSON error handler, and the rest of the body is never read.
                raise HTTPException(413, text)
            return message

        await self.app(scope, counted, send)


class RequestBudget:
    def __init__(self, app: ASGIApp, seconds: float, longer: dict[str, float] | None = None) -> None:
        self.app, self.seconds, self.longer = app, seconds, longer or {}  # longer: path -> seconds (uploads)
        self._abandoned: set[asyncio.Task] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = abandoned = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if abandoned:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        seconds = self.longer.get(scope["path"], self.seconds)
        task = asyncio.ensure_future(self.app(scope, receive, guarded_send))
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if done:
            task.result()  # re-raises what the app raised
            return
        abandoned = True
        self._abandoned.add(task)
        task.add_done_callback(self._forget)
        task.cancel()
        if started:  # half a response is out: all that is left is to close the connection
            raise RuntimeError(f"{scope['method']} {scope['path']}: response not finished within the time budget")
        log.warning("%s %s: no answer within %g s (REQUEST_TIMEOUT_SECONDS)", scope["method"], scope["path"], seconds)
        detail = f"request not answered within {seconds:g} s (REQUEST_TIMEOUT_SECONDS); try again later"
        await JSONResponse({"detail": detail}, status_code=503, headers=RETRY_AFTER)(scope, receive, send)

    def _forget(self, task: asyncio.Task) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("abandoned request failed later: %s", task.exception())
