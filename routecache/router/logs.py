"""Logging setup: text for people, JSON lines for log collectors; every line names its request."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any, Literal

# The request being handled by the current task; "-" outside any request.
REQUEST_ID: ContextVar[str] = ContextVar("routecache_request_id", default="-")

# Calls one line per HTTP request or model load: they drown the service's own lines.
_CHATTY = ("httpx", "httpcore", "aiohttp.access", "faiss.loader")

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "request_id"}


def new_request_id(given: str | None = None) -> str:
    """Adopt the caller's id (so one id follows a request across services) or make one."""
    request_id = given.strip()[:128] if given and given.strip() else uuid.uuid4().hex
    REQUEST_ID.set(request_id)
    return request_id


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, request_id and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", REQUEST_ID.get()),
        }
        # Never over the standard fields: log pipelines filter on level and logger.
        taken = _RESERVED | line.keys()
        line.update({k: v for k, v in vars(record).items() if k not in taken})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(fmt: Literal["text", "json"], level: str, *, quiet_libraries: bool) -> None:
    """Replace the root handlers; called once by the CLI (tests keep pytest's own logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING if quiet_libraries else logging.NOTSET)
