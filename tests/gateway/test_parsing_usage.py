"""Table tests for the routing-field parser and the usage extractor (pure functions)."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidField, InvalidJSON
from gateway.parsing import Kind, parse_request
from gateway.usage import extract_usage, stream_completed


@pytest.mark.parametrize(
    ("body", "kind", "chars", "stream", "max_tokens"),
    [
        (b'{"model":"m","messages":[{"role":"user","content":"abcd"}]}', Kind.CHAT, 4, False,
         None),
        (b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"}]}],'
         b'"stream":true,"max_tokens":7}', Kind.CHAT, 8, True, 7),
        (b'{"model":"m","prompt":[1,2,3],"max_completion_tokens":3,"max_tokens":9}',
         Kind.COMPLETIONS, 12, False, 3),
        (b'{"model":"m","prompt":"xy","stream":null}', Kind.COMPLETIONS, 2, False, None),
        (b'{"model":"m","input":["ab","cd"]}', Kind.EMBEDDINGS, 4, False, None),
    ],
)  # fmt: skip
def test_fields(body: bytes, kind: Kind, chars: int, stream: bool, max_tokens: int | None) -> None:
    fields = parse_request(body, kind)
    assert fields.model == "m"
    assert (fields.prompt_chars, fields.stream, fields.max_tokens) == (chars, stream, max_tokens)
    assert fields.prompt_tokens_estimate == (chars + 3) // 4


@pytest.mark.parametrize(
    ("body", "kind", "error", "param"),
    [
        (b"", Kind.CHAT, InvalidJSON, None),
        (b'"str"', Kind.CHAT, InvalidJSON, None),
        (b'{"model":"","messages":[{}]}', Kind.CHAT, InvalidField, "model"),
        (b'{"model":"m","messages":[1]}', Kind.CHAT, InvalidField, "messages"),
        (b'{"model":"m","prompt":{}}', Kind.COMPLETIONS, InvalidField, "prompt"),
        (b'{"model":"m","input":"x","stream":true}', Kind.EMBEDDINGS, InvalidField, "stream"),
        (b'{"model":"m","prompt":"x","max_tokens":-1}', Kind.COMPLETIONS, InvalidField,
         "max_tokens"),
        (b'{"model":"m","prompt":"x","max_tokens":true}', Kind.COMPLETIONS, InvalidField,
         "max_tokens"),
        (b'{"model":"m","prompt":"x","stream_options":1}', Kind.COMPLETIONS, InvalidField,
         "stream_options"),
        (b'{"model":"m","prompt":"x","user":5}', Kind.COMPLETIONS, InvalidField, "user"),
    ],
)  # fmt: skip
def test_rejections(body: bytes, kind: Kind, error: type[Exception], param: str | None) -> None:
    with pytest.raises(error) as info:
        parse_request(body, kind)
    assert getattr(info.value, "param", None) == param


def test_usage_from_sse_tail_and_body() -> None:
    tail = (
        b'data: {"choices":[{"delta":{}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert extract_usage(tail, sse=True) == {"prompt_tokens": 3, "completion_tokens": 2}
    assert stream_completed(tail)
    assert extract_usage(b'data: {"choices":[],"usage":null}\n\n', sse=True) is None
    assert extract_usage(b'data: {"usage": {broken\n\n', sse=True) is None
    assert not stream_completed(b'data: {"x":1}\n\n')
    assert extract_usage(b'{"usage":{"total_tokens":5}}', sse=False) == {"total_tokens": 5}
    assert extract_usage(b"not json", sse=False) is None
    assert extract_usage(b"[1]", sse=False) is None
