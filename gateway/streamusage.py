"""Ask the engine for a stream's ``usage`` when the client did not, and hide it again.

Token limits settle against the engine's real ``usage`` (:mod:`gateway.ratelimit`), which a
stream carries only when ``stream_options.include_usage`` is set: one extra chunk before
``[DONE]`` with ``"choices": []``. Clients that did not ask for it may read ``choices[0]`` of
every chunk and break on it (openai-contract.md, section 2), so when the gateway injects the
option (:func:`with_include_usage`) the proxy strips that chunk again
(:class:`UsageChunkFilter`) while still reading the usage from the bytes it received.

Only streams of callers with a token limit pay for this (one JSON round trip of the body and
an event scan of each chunk); everyone else's bytes pass untouched.

Example::

    body = with_include_usage({"model": "m", "stream": True, "messages": []})
    strip = UsageChunkFilter()
    strip.feed(b'data: {"choices":[],"usage":{"total_tokens":3}}\\n\\ndata: [DONE]\\n\\n')
    # -> b'data: [DONE]\\n\\n'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["UsageChunkFilter", "with_include_usage"]

_SEP = b"\n\n"
_EMPTY_CHOICES = b'"choices":[]'
_EMPTY_CHOICES_SPACED = b'"choices": []'
_MAX_PENDING = 1 << 20
"""A partial event longer than this is passed on unfiltered (no unbounded buffering)."""


def with_include_usage(document: Mapping[str, Any]) -> bytes:
    """The request body, parsed once by the route (``RequestFields.document``), serialised
    with ``stream_options.include_usage`` set to true, other stream options kept (the
    document itself is not changed)."""
    options = document.get("stream_options") or {}
    return orjson.dumps({**document, "stream_options": {**options, "include_usage": True}})


def is_usage_event(event: bytes) -> bool:
    """The include_usage chunk: a ``data:`` event with an empty ``choices`` and a ``usage``."""
    if b'"usage"' not in event or not event.lstrip().startswith(b"data:"):
        return False
    try:
        obj = orjson.loads(event.lstrip()[5:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and bool(obj.get("usage"))


class UsageChunkFilter:
    """Drops the usage event from an SSE byte stream cut into arbitrary chunks.

    Events end with a blank line (``\\n\\n``: vLLM and enginesim); a chunk's trailing partial
    event waits for the next chunk. ``flush()`` returns whatever is left at the end."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        if _EMPTY_CHOICES not in data and _EMPTY_CHOICES_SPACED not in data:
            # The common case: no event here can be the usage chunk (every other chunk has
            # choices, and may carry "usage": null); whole events pass without a copy.
            if data.endswith(_SEP):
                self._pending = b""
                return data
            cut = data.rfind(_SEP)
            if cut < 0:
                return self._hold(data)
            self._pending = data[cut + 2 :]
            return data[: cut + 2]
        events = data.split(_SEP)
        tail = events.pop()  # b"" when data ended on a separator
        out = b"".join(event + _SEP for event in events if not is_usage_event(event))
        return out + self._hold(tail)

    def flush(self) -> bytes:
        out, self._pending = self._pending, b""
        return out

    def _hold(self, partial: bytes) -> bytes:
        if len(partial) > _MAX_PENDING:
            self._pending = b""
            return partial
        self._pending = partial
        return b""
