"""Find the ``usage`` object at the end of a response without parsing the stream as it flows.

The proxy keeps only a bounded tail of each response; at the end it looks for the last JSON
object carrying ``usage`` (the final SSE chunk when ``include_usage`` was set, or the body of a
non-streaming response).

Example::

    tail = b'data: {"choices":[],"usage":{"total_tokens":5}}\\n\\ndata: [DONE]\\n\\n'
    extract_usage(tail, sse=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

TAIL_BYTES = 16 * 1024
"""How much of a stream's end the proxy keeps (usage chunk + ``[DONE]`` fit easily)."""

BODY_BYTES = 1024 * 1024
"""Non-streaming bodies up to this size are kept whole to read ``usage``."""


def _usage_of(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, dict):
        usage = obj.get("usage")
        if isinstance(usage, dict):
            return usage
    return None


def extract_usage(data: bytes, *, sse: bool) -> Mapping[str, Any] | None:
    """The last ``usage`` object in ``data`` (an SSE tail or a whole JSON body), if any."""
    if not sse:
        try:
            return _usage_of(orjson.loads(data))
        except orjson.JSONDecodeError:
            return None
    for event in reversed(data.split(b"\n\n")):
        line = event.strip()
        if not line.startswith(b"data: {") or b'"usage"' not in line:
            continue
        try:
            usage = _usage_of(orjson.loads(line[6:]))
        except orjson.JSONDecodeError:
            continue
        if usage is not None:
            return usage
    return None


def stream_completed(tail: bytes) -> bool:
    """Whether an SSE stream's tail holds the ``data: [DONE]`` terminator."""
    return b"data: [DONE]" in tail
