"""What the running system tells operators: Prometheus metrics of our own (HTTP metrics come from
prometheus-fastapi-instrumentator, see backend/api/observability.py) and the log format.

Metrics live in the process's default registry; `/metrics` serves it."""

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from prometheus_client import Counter, Gauge, Histogram

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

EMBED_SECONDS = Histogram(
    "imsrc_embed_seconds", "Time to embed one batch of query or uploaded images", buckets=(*_FAST, 2.5, 10.0)
)
EMBED_IMAGES = Counter("imsrc_embedded_images_total", "Images embedded for searches and uploads")
SEARCH_STAGE_SECONDS = Histogram(
    "imsrc_search_stage_seconds",
    "Time per search stage and query: prototypes (stage 1), search (stage 2, FAISS), own_image (the probe for a"
    " stored image's near copy, when it runs), fetch (result metadata)",
    ["stage"],
    buckets=_FAST,
)
INDEX_VECTORS = Gauge("imsrc_index_vectors", "Vectors in the live index", ["model"])
INDEX_REFRESHES = Counter("imsrc_index_refreshes_total", "Index refreshes that changed the index, by kind", ["kind"])
DATABASE_ERRORS_TOTAL = Counter(
    "imsrc_database_errors_total", "Database calls that failed (down, frozen, timed out), by where", ["where"]
)

# The request id of the request being served, so every log line written while serving it carries it.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message, request id and extras."""

    EXTRAS = ("method", "path", "status", "duration_ms", "client", "api_key")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            out["request_id"] = rid
        for key in self.EXTRAS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """Control characters (line breaks, NUL, ESC, ...) as visible escapes: one record stays one line, and
    a path like `/x%0A... INFO imsrc.access: FORGED` cannot write a line of its own or steer a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """`time level logger: message`, the message with its control characters escaped; a traceback's lines
    are indented, so none of them can pass for a record of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return "\n".join("    " + escape_controls(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape_controls(line) for line in stack_info.splitlines())


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get() or "-"
        return True


OUR_LOGGERS = ("backend", "imsrc", "uvicorn")


def configure_logging(fmt: Literal["text", "json"], verbose: bool, serving: bool = False) -> None:
    """Root logging for the CLI and the server (uvicorn's loggers propagate to it): warnings only, except
    with --verbose; a server also logs its own (and uvicorn's) information: start-up, index, requests."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose or serving else logging.NOTSET)
