"""The proxy's first-token detection: the empty role delta is not a token.

Engines (enginesim at once, vLLM with the first output) send a chat stream's first chunk as
``{"delta": {"role": "assistant", "content": ""}}``. Counting that as the first token empties
the router's queued-prefill counter on admission, which blinds the prefix-cache cost model to
the queue it should weigh against a cache hit.
"""

from __future__ import annotations

import pytest

from gateway.proxy import carries_token

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (ROLE, False),
        (b'data: {"choices":[{"index":0,"delta":{"content":"ka"}}]}\n\n', True),
        (b'data: {"choices":[{"index":0,"delta":{"content": " lo"}}]}\n\n', True),
        (ROLE + b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n', True),
        (b'data: {"choices":[{"index":0,"text":" mi","logprobs":null}]}\n\n', True),
        (b'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}\n\n', False),
        (b'data: {"choices":[],"usage":{"prompt_tokens":5}}\n\n', False),
        (b"data: [DONE]\n\n", False),
        (b'data: {"choices":[{"delta":{"content":"\\"q"}}]}\n\n', True),
    ],
)
def test_carries_token(chunk: bytes, expected: bool) -> None:
    assert carries_token(chunk) is expected
