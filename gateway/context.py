"""Per-request context carried in contextvars (set by the request-id middleware)."""

from __future__ import annotations

import contextvars

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "switchyard_request_id", default=None
)


def current_request_id() -> str | None:
    """The id of the request being served in this task, if any."""
    return _REQUEST_ID.get()


def set_request_id(value: str) -> contextvars.Token[str | None]:
    return _REQUEST_ID.set(value)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _REQUEST_ID.reset(token)
