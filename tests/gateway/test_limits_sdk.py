"""Rate limits as the official ``openai`` SDK meets them: a real gateway with a real Redis,
429s in OpenAI's envelope with exact ``retry-after-ms``, which the SDK honours when it retries,
``x-ratelimit-*`` on every answer, ``x-should-retry: false`` when waiting cannot help, and
a metered stream whose usage chunk the client did not ask for is settled but not shown."""

from __future__ import annotations

import logging
import re

import httpx
import openai
import pytest

from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.fakeupstream import FakeEngine
from tests.gateway.servers import ServerThread, wait_until
from tests.redis_server import RedisServer

KEY = "sk-sdk-limits-0123456789"
TOKENS_KEY = "sk-sdk-tokens-012345678"


def _gateway(
    start_engines: StartEngines, start_gateway: StartGateway, redis: RedisServer
) -> tuple[FakeEngine, ServerThread]:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway(
        [srv.url],
        redis_url=redis.url,
        admin_key="sk-admin-0123456789",
        # rpm 120 over a 1 s window: 2 requests per second, a full second's quota as a burst.
        limits={"window_s": 1.0},
        api_keys=[{"key": KEY, "rpm": 120}, {"key": TOKENS_KEY, "tpm": 6000}],
    )
    return engine, gw


def test_sdk_gets_429_with_exact_retry_after_and_honours_it(
    start_engines: StartEngines,
    start_gateway: StartGateway,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, gw = _gateway(start_engines, start_gateway, redis_server)
    seen: list[httpx.Response] = []
    http = openai.DefaultHttpxClient(event_hooks={"response": [seen.append]})
    no_retry = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
    with no_retry:
        for _ in range(2):
            no_retry.completions.create(model="fake-model", prompt="hi", max_tokens=3)
        with pytest.raises(openai.RateLimitError) as denied:
            no_retry.completions.create(model="fake-model", prompt="hi", max_tokens=3)
    headers = denied.value.response.headers
    assert denied.value.status_code == 429
    assert denied.value.body == {  # the OpenAI envelope, no key in it
        "message": denied.value.body["message"],  # type: ignore[index]
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert KEY not in denied.value.response.text
    assert 0 < int(headers["retry-after-ms"]) <= 1000
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert engine.requests == 2  # the denied request never reached the engine

    caplog.set_level(logging.INFO, logger="openai._base_client")
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=5,
                       http_client=http) as sdk:  # fmt: skip
        for _ in range(3):  # the third waits for the window: the SDK retries on its own
            sdk.completions.create(model="fake-model", prompt="hi", max_tokens=3)
    limited = [r for r in seen if r.status_code == 429]
    assert limited, "the burst should have met the limit"
    waits = [
        float(m.group(1))
        for m in (re.search(r"Retrying request in ([0-9.]+) seconds", r.getMessage())
                  for r in caplog.records)
        if m
    ]  # fmt: skip
    # Each retry waited exactly what the gateway said (not the SDK's own backoff).
    assert waits == pytest.approx(
        [int(r.headers["retry-after-ms"]) / 1000 for r in limited], abs=1e-6
    )
    for r in seen:
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert "x-ratelimit-reset-requests" in r.headers


def test_a_request_larger_than_the_token_budget_says_do_not_retry(
    start_engines: StartEngines, start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    engine, gw = _gateway(start_engines, start_gateway, redis_server)
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TOKENS_KEY, max_retries=3) as sdk:
        with pytest.raises(openai.RateLimitError) as denied:
            # 6,000 tokens a minute on a 1 s window: 100 a window; this asks for 500.
            sdk.completions.create(model="fake-model", prompt="hi", max_tokens=500)
    assert denied.value.response.headers["x-should-retry"] == "false"
    assert engine.requests == 0  # refused once, not retried by the SDK


def test_metered_stream_hides_the_injected_usage_chunk_and_settles(
    start_engines: StartEngines, start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway(
        [srv.url], redis_url=redis_server.url, admin_key="sk-admin-0123456789",
        api_keys=[{"key": TOKENS_KEY, "tpm": 200}],  # a 60 s window
    )  # fmt: skip
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TOKENS_KEY, max_retries=0) as sdk:
        short = {"fake": {"tokens": 3}}  # the fake engine stops after 3 of the 40 allowed
        chunks = list(
            sdk.chat.completions.create(**chat, max_tokens=40, stream=True, extra_body=short)
        )
        asked = list(
            sdk.chat.completions.create(
                **chat, max_tokens=40, stream=True, stream_options={"include_usage": True},
                extra_body=short,
            )
        )  # fmt: skip
    assert b'"include_usage":true' in engine.bodies[0]  # the gateway asked the engine
    assert all(chunk.choices for chunk in chunks)  # ... and hid the answer from the client
    assert all(chunk.usage is None for chunk in chunks)
    assert asked[-1].choices == [] and asked[-1].usage is not None  # asked: passed through
    # Each stream reserved its prompt estimate + 40 and used 3 + 3: once settled, a request
    # reserving 150 fits in the 200 (it would not beside two unsettled reservations).
    # Settlements are sent off the request path, so poll (bounded; a refused try is not
    # charged).
    with httpx.Client(timeout=10) as client:

        def fits() -> bool:
            r = client.post(
                f"{gw.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {TOKENS_KEY}"},
                json={**chat, "max_tokens": 148},
            )
            return r.status_code == 200

        assert wait_until(fits, timeout=10, interval=0.1)
