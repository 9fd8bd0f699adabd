"""Logging setup for the CLI process: text or JSON lines, each with the request id, secrets
redacted.

Configured once by the CLI (:func:`configure_logging`); library code only calls
``logging.getLogger(__name__)`` with lazy ``%s`` arguments. Every line logged while a
request is served carries its id (``request_id``, from the middleware's contextvar; ``-``
outside a request). A record may carry structured fields in ``record.access`` (a mapping:
the access log, :mod:`gateway.accesslog`): JSON lines get them as top-level keys, text lines
as ``key=value`` pairs.

Secrets never reach the output: each formatted line goes through :func:`redact`, which
masks bearer tokens, ``Authorization``/``api_key``/``password``/``token`` values, Switchyard
keys (``sk-sy-...``) and other ``sk-`` keys, and the password of any URL
(``redis://user:secret@host`` -> ``redis://user:***@host``). The cost is one regex pass per
line written, none per line filtered out by level.

Example::

    configure_logging("INFO", "json")
    logging.getLogger("gateway.x").warning("engine %s failed", "e1")
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import orjson

from gateway.context import current_request_id

__all__ = [
    "JsonFormatter",
    "LogFormat",
    "RequestIdFilter",
    "TextFormatter",
    "configure_logging",
    "make_handler",
    "redact",
]

LogFormat = Literal["text", "json"]

MASK = "***"
_SECRETS = re.compile(
    # Authorization: Bearer <token> (and a bare "Bearer <token>")
    r"(?P<bearer>\b[Bb]earer\s+)[^\s\"',;\\]+"
    # api_key=..., "password": "...", token: ..., authorization: Basic ..., x-api-key ...
    r"|(?P<field>\b(?:[Aa]uthorization|[Pp]roxy-[Aa]uthorization|(?:x-)?api[_-]?key|admin[_-]?key"
    r"|[Pp]assword|[Pp]asswd|[Ss]ecret|[Tt]oken)\b[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?:Basic|Bearer|Token)\s+)?)(?!\*\*\*)[^\s\"',;&}\\]+"
    # keys by their shape: sk-sy-<...> (Switchyard), sk-<...> (OpenAI-style)
    r"|(?P<key>\bsk-)[A-Za-z0-9_\-]{8,}"
    # scheme://user:password@host (redis, rediss, redis+sentinel, http, ...)
    r"|(?P<url>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@\"'\\]*:)[^\s/@\"'\\]+(?=@)"
)


def _mask(match: re.Match[str]) -> str:
    prefix = next(g for g in (match["bearer"], match["field"], match["key"], match["url"]) if g)
    return prefix + MASK


def _may_hold_secret(low: str) -> bool:
    """False when :data:`_SECRETS` cannot match ``low`` (the line in lower case): the regex
    pass (~50 us on an access line) runs only when one of these substrings is there."""
    return (
        "bearer" in low or "sk-" in low or "://" in low or "authorization" in low
        or "api_key" in low or "api-key" in low or "apikey" in low or "admin_key" in low
        or "admin-key" in low or "passw" in low or "secret" in low or "token=" in low
        or "token:" in low or "token " in low or 'token"' in low or "token'" in low
    )  # fmt: skip


def redact(text: str) -> str:
    """``text`` with every secret it shows replaced by ``***`` (see the module docstring)."""
    return _SECRETS.sub(_mask, text) if _may_hold_secret(text.lower()) else text


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) from the middleware's contextvar."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


def _access(record: logging.LogRecord) -> Mapping[str, Any] | None:
    fields = getattr(record, "access", None)
    return fields if isinstance(fields, Mapping) else None


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, the record's
    ``access`` fields, exc (when there is one); redacted."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        fields = _access(record)
        if fields is not None:
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(out, default=str).decode())


class TextFormatter(logging.Formatter):
    """``<asctime> <level> <logger> [<request id>] <message>`` plus the ``access`` fields as
    ``key=value``; redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        line = super().format(record)
        fields = _access(record)
        if fields is not None:
            line += "".join(f" {k}={v}" for k, v in fields.items() if v is not None)
        return redact(line)


def make_handler(fmt: LogFormat = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the request-id filter and the formatter."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


def configure_logging(level: str, fmt: LogFormat = "text") -> None:
    """Configure the root logger once, in the CLI process only."""
    root = logging.getLogger()
    root.handlers[:] = [make_handler(fmt)]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: one line per health probe and per proxied call.
    logging.getLogger("httpx").setLevel(logging.WARNING)
