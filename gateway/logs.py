"""Logging setup for the CLI process: text or JSON lines, each with the request id.

Configured once by the CLI (:func:`configure_logging`); library code only calls
``logging.getLogger(__name__)`` with lazy ``%s`` arguments.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import orjson

from gateway.context import current_request_id

LogFormat = Literal["text", "json"]


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) from the middleware's contextvar."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def configure_logging(level: str, fmt: LogFormat = "text") -> None:
    """Configure the root logger once, in the CLI process only."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: one line per health probe and per proxied call.
    logging.getLogger("httpx").setLevel(logging.WARNING)
