"""Every error as one JSON body `{"detail": "..."}`, and what the OpenAPI schema declares of them.

Client mistakes are 4xx with a bounded message; a database that is down, frozen or slow is a 503 (the
connection stays open); only a bug is a 500."""

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from procrastinate.exceptions import ConnectorException
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from backend.core.errors import AppError
from backend.core.text import echo
from backend.storage.engine import DRIVER_ERRORS, database_problem, is_outage
from backend.telemetry import DATABASE_ERRORS_TOTAL

log = logging.getLogger(__name__)

# Every 503 says when to try again: a database that is down, frozen or slow usually answers within seconds.
RETRY_AFTER_S = 5
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_S)}


class ErrorOut(BaseModel):
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    detail: str  # every problem in one line
    errors: list[FieldError] = []  # per field, when the problem is in the request's shape


_DESCRIPTIONS = {
    304: "not modified (ETag matched)",
    400: "invalid image, or a body that cannot be parsed",
    401: "no API key, or an invalid or revoked one",
    403: "the API key lacks the scope, or a cross-site request",
    404: "not found",
    409: "conflicts with what is stored (a near-duplicate, with on_near_duplicate=refuse)",
    413: "request body larger than MAX_UPLOAD_SIZE",
    422: "invalid parameters",
    503: "database unavailable, or the request not answered within REQUEST_TIMEOUT_SECONDS",
}


def error_responses(*codes: int, ok: dict[int | str, dict[str, Any]] | None = None) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: `ok` (its successes, when the default needs saying) and each error
    status it can answer, with its body model. Every route can answer 503 (database trouble, time budget)."""
    out: dict[int | str, dict[str, Any]] = {}
    out.update(ok or {})
    for code in sorted({*codes, 503}):
        entry: dict[str, Any] = {"description": _DESCRIPTIONS[code]}
        if code != 304:
            entry["model"] = ValidationErrorOut if code == 422 else ErrorOut
        if code == 503:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
        out[code] = entry
    return out


def api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, including those of included routers (which FastAPI keeps behind a wrapper)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def _methods_at(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this request's path."""
    methods: set[str] = set()
    for route in api_routes(app.routes):
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _field_errors(exc: RequestValidationError) -> list[FieldError]:
    # Only loc, msg and type: `input` and `ctx` may hold bytes, uploaded files or exceptions that do not
    # serialise, and would echo whatever the client sent.
    return [
        FieldError(
            loc=[p if isinstance(p, int) else echo(p, 40) for p in e.get("loc", ())],
            msg=echo(e.get("msg", ""), 200),
            type=str(e.get("type", "")),
        )
        for e in exc.errors()[:20]
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> JSONResponse:
        headers = RETRY_AFTER if exc.status_code == 503 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        problems = [f"{'.'.join(str(p) for p in e.loc[1:]) or e.loc[0] if e.loc else 'request'}: {e.msg}" for e in errors]
        body = ValidationErrorOut(detail="; ".join(problems) or "invalid request", errors=errors)
        return JSONResponse(body.model_dump(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette lists only the first matching route's methods
            headers["Allow"] = ", ".join(_methods_at(app, request))
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        if not is_outage(exc):
            raise exc  # a bug in our SQL: a 500, logged with its traceback
        problem = database_problem(exc)
        DATABASE_ERRORS_TOTAL.labels("request").inc()
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path, problem)
        return JSONResponse({"detail": f"database unavailable: {problem}"}, status_code=503, headers=RETRY_AFTER)

    # Whichever driver raised it: SQLAlchemy's wrappers, psycopg2, psycopg 3 (the COPY of bulk reads) and
    # procrastinate's ConnectorException (deferring a job), which carries the driver's error as its cause.
    for error in (*DRIVER_ERRORS, ConnectorException):
        if not issubclass(error, AppError):
            app.add_exception_handler(error, database_error)
