"""Small response helpers: JSON via orjson, and the OpenAI error envelope as a response."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from gateway.context import current_request_id
from gateway.errors import GatewayError


class JSONBytes(Response):
    """``JSONBytes({"ok": True}, status_code=200)``: orjson-encoded ``application/json``."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: GatewayError, *, extra: dict[str, Any] | None = None) -> JSONBytes:
    """The OpenAI envelope for ``exc`` with its status, headers and ``x-request-id``."""
    body: dict[str, Any] = dict(exc.envelope())
    if extra:
        body.update(extra)
    headers = dict(exc.headers())
    rid = current_request_id()
    if rid:
        headers["x-request-id"] = rid
    return JSONBytes(body, status_code=exc.status, headers=headers)
