"""The include_usage injection and the filter that hides the usage chunk again."""

from __future__ import annotations

import orjson
import pytest

from gateway.parsing import Kind, parse_request
from gateway.streamusage import UsageChunkFilter, is_usage_event, with_include_usage

CHUNK = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
USAGE = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
DONE = b"data: [DONE]\n\n"
STREAM = CHUNK + CHUNK + USAGE + DONE


@pytest.mark.parametrize(
    ("body", "options"),
    [
        ({"model": "m", "stream": True}, {"include_usage": True}),
        ({"model": "m", "stream": True, "stream_options": None}, {"include_usage": True}),
        (
            {"model": "m", "stream": True, "stream_options": {"include_obfuscation": False}},
            {"include_obfuscation": False, "include_usage": True},
        ),
        (
            {"model": "m", "stream": True, "stream_options": {"include_usage": False}},
            {"include_usage": True},
        ),
    ],
)
def test_with_include_usage_sets_the_option_and_keeps_the_rest(
    body: dict[str, object], options: dict[str, object]
) -> None:
    before = orjson.dumps(body)
    out = orjson.loads(with_include_usage(body))
    assert orjson.dumps(body) == before  # the parsed document is left as it was
    assert out["stream_options"] == options
    assert {k: v for k, v in out.items() if k != "stream_options"} == {
        k: v for k, v in body.items() if k != "stream_options"
    }


@pytest.mark.parametrize(
    ("options", "asked"),
    [
        (None, False),
        ({}, False),
        ({"include_usage": False}, False),
        ({"include_usage": True}, True),
    ],
)
def test_parsing_reads_whether_the_client_asked_for_usage(
    options: dict[str, object] | None, asked: bool
) -> None:
    body = {"model": "m", "stream": True, "prompt": "x", "stream_options": options}
    assert parse_request(orjson.dumps(body), Kind.COMPLETIONS).include_usage is asked


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (USAGE.strip(), True),
        (CHUNK.strip(), False),  # usage null, choices present
        (b'data: {"choices":[],"usage":null}', False),
        (b'data: {"choices":[{"index":0}],"usage":{"total_tokens":1}}', False),
        (b"data: [DONE]", False),
        (b': keep-alive "usage"', False),
        (b'data: {"usage": broken', False),
    ],
)
def test_is_usage_event(event: bytes, expected: bool) -> None:
    assert is_usage_event(event) is expected


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 50, 97, len(STREAM)])
def test_filter_drops_only_the_usage_chunk_at_any_chunking(size: int) -> None:
    strip = UsageChunkFilter()
    out = b"".join(strip.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
    out += strip.flush()
    assert out == CHUNK + CHUNK + DONE


def test_filter_passes_a_stream_without_usage_unchanged() -> None:
    strip = UsageChunkFilter()
    assert strip.feed(CHUNK + DONE[:5]) == CHUNK
    assert strip.feed(DONE[5:]) == DONE
    assert strip.flush() == b""


def test_filter_does_not_buffer_without_bound() -> None:
    strip = UsageChunkFilter()
    huge = b"data: " + b"x" * (1 << 20) + b"!"
    assert strip.feed(huge) == huge  # over the cap: passed on as it is
    assert strip.flush() == b""
