"""One log line per request (request id, method, path, status, time) and HTTP metrics for /metrics.

The request id is the client's `X-Request-ID` when it is a short token, else a new one; it is sent back
in the response's `X-Request-ID` and carried by every log line written while the request is served."""

import logging
import re
import time
import uuid

from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.telemetry import request_id

log = logging.getLogger("imsrc.access")
_TOKEN = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given.decode() if _TOKEN.match(given) else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        status = 500  # what the client gets if the app fails before answering
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            ms = round((time.perf_counter() - start) * 1000, 2)
            client = scope.get("client")
            state = scope.get("state") or {}
            extra = {
                "request_id": rid,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": ms,
                "client": client[0] if client else None,
                "api_key": state.get("api_key"),
            }
            key = f" key={extra['api_key']}" if extra["api_key"] else ""
            log.info("%s %s %s %d %.2f ms%s", rid, scope["method"], scope["path"], status, ms, key, extra=extra)
            request_id.reset(token)


def instrument(app: FastAPI) -> None:
    """HTTP request counts and latencies by route template, method and status (prometheus-fastapi-instrumentator)."""
    Instrumentator(excluded_handlers=["/metrics"], should_group_status_codes=False).instrument(app)
