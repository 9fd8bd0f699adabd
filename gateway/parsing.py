"""Parse only what routing needs from an OpenAI request body; the bytes are forwarded as-is.

We check the few fields the gateway itself relies on (``model``, ``stream``, the prompt
field's presence and type, ``max_tokens``, ``user``) so that obviously broken requests get a
clear 400 here; everything else (sampling params, tools, vLLM extras) is the engine's business.

Example::

    fields = parse_request(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', CHAT)
    fields.model, fields.prompt_chars
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import InvalidField, InvalidJSON

CHARS_PER_TOKEN = 4


class Kind(enum.StrEnum):
    """Which OpenAI endpoint a body belongs to, with its upstream path."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"


_PROMPT_FIELD = {Kind.CHAT: "messages", Kind.COMPLETIONS: "prompt", Kind.EMBEDDINGS: "input"}


@dataclass(frozen=True, slots=True)
class RequestFields:
    model: str
    stream: bool
    prompt_chars: int
    max_tokens: int | None
    user: str | None
    prompt: Any = field(default=None, repr=False, compare=False)
    """The prompt field as parsed (messages, prompt or input), for prefix hashing."""
    include_usage: bool = False
    """The client asked for the final usage chunk (``stream_options.include_usage``)."""
    document: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The whole parsed body (what a rewrite of it starts from; the original bytes are what
    is forwarded otherwise)."""

    @property
    def prompt_tokens_estimate(self) -> int:
        return (self.prompt_chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _text_len(value: Any) -> int:
    """Characters of text in a prompt/messages value (token-id lists count one char per id)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return CHARS_PER_TOKEN
    if isinstance(value, list):
        return sum(_text_len(item) for item in value)
    if isinstance(value, dict):
        total = _text_len(value.get("content"))
        if value.get("type") == "text":
            total += _text_len(value.get("text"))
        return total
    return 0


def _check_prompt(kind: Kind, value: Any) -> None:
    name = _PROMPT_FIELD[kind]
    if value is None:
        raise InvalidField(f"'{name}' is a required property", param=name)
    if kind is Kind.CHAT:
        if not isinstance(value, list) or not value:
            raise InvalidField("'messages' must be a non-empty array", param=name)
        if not all(isinstance(m, dict) for m in value):
            raise InvalidField("each message must be an object", param=name)
    elif not isinstance(value, str | list):
        raise InvalidField(f"'{name}' must be a string or an array", param=name)


def parse_request(body: bytes, kind: Kind) -> RequestFields:
    """Validate the routing-relevant fields; raises :class:`InvalidJSON`/:class:`InvalidField`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidJSON("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidField("'model' must be a non-empty string", param="model")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidField("'stream' must be a boolean", param="stream")
    if kind is Kind.EMBEDDINGS and stream:
        raise InvalidField("embeddings cannot be streamed", param="stream")
    prompt = data.get(_PROMPT_FIELD[kind])
    _check_prompt(kind, prompt)
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0
    ):
        raise InvalidField("'max_tokens' must be a non-negative integer", param="max_tokens")
    stream_options = data.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidField("'stream_options' must be an object", param="stream_options")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidField("'user' must be a string", param="user")
    return RequestFields(
        model=model,
        stream=stream,
        prompt_chars=_text_len(prompt),
        max_tokens=max_tokens,
        user=user,
        prompt=prompt,
        include_usage=bool(stream_options and stream_options.get("include_usage") is True),
        document=data,
    )
