"""The access log: one line per proxied request, on the ``switchyard.access`` logger.

:class:`AccessLog` is a :class:`gateway.exchange.RequestObserver`: the proxy calls it once
per request after its last byte, however it ended (the same record metrics and limits
settle on), and the proxied routes call :meth:`AccessLog.refused` for a request answered
before any engine was tried (401, 404, 429, 503 ...). Each line carries its fields as a
structured ``access`` mapping (``record.access``): :mod:`gateway.logs` writes them as JSON
keys (``log_format: json``) or ``key=value`` pairs. Fields: ``method``, ``path``, ``status``,
``outcome``, ``model`` (as requested), ``adapter``, ``engine``, ``policy``, ``stream``,
``ttft_s``, ``duration_s``, ``prompt_tokens``, ``completion_tokens``, ``key_id`` -- never
the key itself (a :class:`gateway.principal.Principal` holds only its id), nor a body or a
header. Off (``server.access_log: false``) the observer is not registered at all: nothing
runs per request.

Example::

    access = AccessLog()
    proxy = Proxy(..., observers=(access,))
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.exchange import FinishedRequest, request_tokens
from gateway.parsing import Kind

__all__ = ["ACCESS_LOGGER", "AccessLog"]

ACCESS_LOGGER = "switchyard.access"
log = logging.getLogger(ACCESS_LOGGER)

_PATHS = {kind: kind.value for kind in Kind}


class AccessLog:
    """Writes the access line of each proxied request (see the module docstring)."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger

    def on_request_finished(self, record: FinishedRequest) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        prompt, completion = request_tokens(record)
        fields: dict[str, Any] = {
            "method": "POST",
            "path": _PATHS.get(record.kind, "-") if record.kind is not None else "-",
            "status": record.status,
            "outcome": record.outcome,
            "model": record.model,
            "adapter": record.adapter,
            "engine": record.endpoint_id,
            "policy": record.policy,
            "stream": record.stream,
            "ttft_s": None if record.ttft_s is None else round(record.ttft_s, 6),
            "duration_s": round(record.duration_s, 6),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "key_id": record.key_id,
        }
        self._emit(fields)

    def refused(
        self,
        *,
        kind: Kind,
        status: int,
        error: str,
        model: str | None,
        key_id: str | None,
        duration_s: float,
    ) -> None:
        """A proxied request answered by the gateway before any engine was tried."""
        if not self._log.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "method": "POST",
            "path": kind.value,
            "status": status,
            "outcome": "refused",
            "error": error,
            "model": model,
            "adapter": None,
            "engine": None,
            "policy": None,
            "stream": None,
            "ttft_s": None,
            "duration_s": round(duration_s, 6),
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "key_id": key_id,
        }
        self._emit(fields)

    def _emit(self, fields: dict[str, Any]) -> None:
        # makeRecord + handle: what ``info()`` does, without looking up the caller's frame
        # (a third of the cost of a line; the access logger's lines all come from here).
        logger = self._log
        record = logger.makeRecord(
            logger.name, logging.INFO, __file__, 0, "%s %s %d",
            (fields["method"], fields["path"], fields["status"]), None, extra={"access": fields},
        )  # fmt: skip
        logger.handle(record)
