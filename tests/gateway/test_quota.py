"""The limits step of a request: what it reserves, what it settles, and the 429 (tables, and
the in-process limiter: no Redis needed for these)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest

from gateway.errors import RateLimited
from gateway.exchange import FinishedRequest
from gateway.parsing import Kind, parse_request
from gateway.principal import Principal
from gateway.quota import UNLIMITED, admit, reserve_tokens, used_tokens
from gateway.ratelimit import RateLimiter
from gateway.settings import LimitSettings

RECORD = FinishedRequest(
    request_id=None, endpoint_id="e1", model="m", adapter=None, stream=True, status=200,
    outcome="ok", duration_s=0.1, ttft_s=0.01, prompt_tokens_estimate=10, usage=None,
    streamed_events=7,
)  # fmt: skip


@pytest.mark.parametrize(
    ("usage", "endpoint", "expected"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, "e1", 7),
        ({"prompt_tokens": 3}, "e1", 3),  # embeddings: no completion tokens
        ({"total_tokens": 9}, "e1", 9),
        ({"prompt_tokens": "x", "total_tokens": 5}, "e1", 5),
        (None, "e1", 17),  # a cut stream: prompt estimate + events relayed
        ({}, None, 0),  # no engine ever answered: nothing used
    ],
)
def test_used_tokens(usage: dict[str, Any] | None, endpoint: str | None, expected: int) -> None:
    assert used_tokens(replace(RECORD, usage=usage, endpoint_id=endpoint)) == expected


def _fields(kind: Kind, **body: Any) -> Any:
    prompt = {"messages": [{"role": "user", "content": "x" * 40}]}
    if kind is not Kind.CHAT:
        prompt = {"prompt" if kind is Kind.COMPLETIONS else "input": "x" * 40}
    return parse_request(orjson.dumps({"model": "m", **prompt, **body}), kind)


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        (Kind.CHAT, {"max_tokens": 50}, 10 + 50),
        (Kind.CHAT, {}, 10 + 1024),  # no max_tokens: the configured default
        (Kind.COMPLETIONS, {"max_tokens": 0}, 10),
        (Kind.EMBEDDINGS, {}, 10),  # nothing generated
    ],
)
def test_reserve_tokens(kind: Kind, body: dict[str, Any], expected: int) -> None:
    assert reserve_tokens(_fields(kind, **body), kind, LimitSettings()) == expected


@pytest.mark.anyio
async def test_admit_skips_callers_without_applicable_limits() -> None:
    limiter = RateLimiter(LimitSettings(), None)
    fields = _fields(Kind.CHAT)
    assert await admit(limiter, Principal("k"), fields, Kind.CHAT, LimitSettings()) is UNLIMITED
    # A per-user limit and no `user` field: no rule applies.
    only_users = Principal("k", user_rpm=1)
    assert await admit(limiter, only_users, fields, Kind.CHAT, LimitSettings()) is UNLIMITED
    assert limiter.local_decisions == 0


@pytest.mark.anyio
async def test_admit_reserves_headers_settles_and_refuses() -> None:
    settings = LimitSettings()
    limiter = RateLimiter(settings, None)
    who = Principal("k", rpm=2, tpm=200)
    fields = _fields(Kind.CHAT, max_tokens=90)  # reserves 100 of the 200
    quota = await admit(limiter, who, fields, Kind.CHAT, settings)
    headers = dict(quota.headers)
    assert headers[b"x-ratelimit-remaining-tokens"] == b"100"
    assert headers[b"x-ratelimit-remaining-requests"] == b"1"
    assert b"retry-after" not in headers
    assert quota.meters_tokens and quota.settlement is not None
    quota.settlement.finished(replace(RECORD, usage={"prompt_tokens": 5, "completion_tokens": 5}))
    quota.settlement.finished(RECORD)  # settled once: a second call changes nothing
    quota.refund()  # nor does a refund after the settlement
    second = await admit(limiter, who, fields, Kind.CHAT, settings)  # 10 + 100 <= 200
    assert dict(second.headers)[b"x-ratelimit-remaining-tokens"] == b"90"
    with pytest.raises(RateLimited) as refused:  # the request limit (2) is reached
        await admit(limiter, who, fields, Kind.CHAT, settings)
    assert refused.value.status == 429
    assert int(refused.value.headers()["retry-after-ms"]) > 0
