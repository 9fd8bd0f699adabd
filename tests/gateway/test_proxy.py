"""The proxy against real fake engines on loopback: pass-through, streaming, errors, failover."""

from __future__ import annotations

import json

import httpx

from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.servers import wait_until

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def test_non_streaming_forwards_original_bytes(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    raw = b'{"model": "fake-model",  "messages": [{"role":"user","content":"hi"}], "top_k": 3}'
    resp = client.post(f"{gw.url}/v1/chat/completions", content=raw,
                       headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert engine.bodies[-1] == raw  # byte for byte, unknown fields and spacing kept
    assert resp.json()["choices"][0]["message"]["content"].startswith("tok0")
    assert resp.headers["x-request-id"].startswith("req_")
    assert engine.headers[-1]["x-request-id"] == resp.headers["x-request-id"]


def test_incoming_request_id_is_kept(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    resp = client.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                       headers={"x-request-id": "abc-123"})  # fmt: skip
    assert resp.headers["x-request-id"] == "abc-123"


def test_stream_first_chunk_arrives_before_engine_finishes(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    body = {**CHAT, "stream": True, "max_tokens": 4, "fake": {"itl": 0.5}}
    with client.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = resp.iter_raw()
        first = next(chunks)
        assert b"chat.completion.chunk" in first
        # The engine is still generating: the gateway did not wait for the end.
        assert engine.running == 1
        rest = first + b"".join(chunks)
    events = _events(rest.decode())
    assert events[-1] == "[DONE]"
    # The fake engine counts its stream done just after it sent [DONE] (its own thread).
    assert wait_until(lambda: engine.running == 0, timeout=5)


def test_stream_with_include_usage_passes_usage_chunk(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    body = {**CHAT, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
    resp = client.post(f"{gw.url}/v1/chat/completions", json=body)
    events = _events(resp.text)
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_upstream_4xx_passes_through_unchanged(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    resp = client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "fake": {"status": 422}})
    assert resp.status_code == 422
    assert resp.json() == {"error": {"message": "e0 fails", "type": "Injected", "code": 422}}


def test_retry_on_5xx_moves_to_next_engine(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    engines[0][0].status = 503
    gw = start_gateway([srv.url for _, srv in engines])
    for _ in range(4):
        resp = client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        assert resp.status_code == 200
        assert resp.headers["x-switchyard-endpoint"] == engines[1][1].url.removeprefix("http://")
    assert engines[0][0].requests >= 1  # it was tried and failed over


def test_last_upstream_5xx_is_passed_through_when_all_fail(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2, status=500)
    gw = start_gateway([srv.url for _, srv in engines])
    resp = client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "Injected"
    assert sum(e.requests for e, _ in engines) == 2  # one attempt each, then give up


def test_dead_engine_fails_over_before_first_byte(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([srv.url for _, srv in engines], health={"interval_s": 60})
    engines[0][1].stop()  # still registered and believed healthy: connect is refused
    for _ in range(4):
        resp = client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True})
        assert resp.status_code == 200
        assert _events(resp.text)[-1] == "[DONE]"
    assert engines[1][0].requests == 4


def test_stream_cut_midway_ends_with_one_error_event(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    body = {**CHAT, "stream": True, "max_tokens": 6, "fake": {"cut_after": 2}}
    resp = client.post(f"{gw.url}/v1/chat/completions", json=body)
    assert resp.status_code == 200
    events = _events(resp.text)
    errors = [e for e in events if e.startswith('{"error"')]
    assert len(errors) == 1 and events[-1] == errors[0]
    assert "[DONE]" not in events
    assert json.loads(errors[0])["error"]["type"] == "server_error"
    # The gateway keeps serving.
    assert client.post(f"{gw.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_client_disconnect_cancels_upstream_and_frees_counters(
    start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    body = {**CHAT, "stream": True, "max_tokens": 50, "fake": {"itl": 0.5}}
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as resp:
            chunks = resp.iter_raw()
            next(chunks)
            assert engine.running == 1
            assert _in_flight(httpx.get(f"{gw.url}/metrics").text) == 1
    # Leaving the block closed the connection mid-stream.
    assert wait_until(lambda: engine.running == 0)
    assert engine.cancelled == 1
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert wait_until(lambda: _in_flight(httpx.get(f"{gw.url}/metrics").text) == 0)
    assert "switchyard_proxy_requests_total" in metrics


def test_client_disconnect_on_non_streaming_request(
    start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    body = {**CHAT, "fake": {"hang": True}}
    with httpx.Client(timeout=0.5) as c:
        try:
            c.post(f"{gw.url}/v1/chat/completions", json=body)
        except httpx.ReadTimeout:
            pass
    assert wait_until(lambda: engine.cancelled == 1)
    assert wait_until(lambda: engine.running == 0)
    assert wait_until(lambda: _in_flight(httpx.get(f"{gw.url}/metrics").text) == 0)


def _in_flight(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("switchyard_proxy_in_flight_requests{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_in_flight_counts_return_to_zero_after_every_outcome(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([srv.url for _, srv in engines])
    url = f"{gw.url}/v1/chat/completions"
    client.post(url, json=CHAT)
    client.post(url, json={**CHAT, "stream": True})
    client.post(url, json={**CHAT, "fake": {"status": 400}})
    client.post(url, json={**CHAT, "stream": True, "fake": {"cut_after": 1}})
    client.post(url, json={**CHAT, "fake": {"status": 503}})
    metrics = client.get(f"{gw.url}/metrics").text
    assert "switchyard_proxy_in_flight_requests{" in metrics
    assert _in_flight(metrics) == 0


def test_slow_first_token_gets_keepalive_comments_and_sdk_ignores_them(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    import openai

    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url], proxy={"sse_keepalive_s": 0.1})
    body = {**CHAT, "stream": True, "max_tokens": 3, "fake": {"ttft": 1.5}}
    resp = client.post(f"{gw.url}/v1/chat/completions", json=body)
    lines = [line for line in resp.text.split("\n") if line]
    assert lines[0] == ": keep-alive"  # before any data
    assert _events(resp.text)[-1] == "[DONE]"
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=3,
            stream=True, extra_body={"fake": {"ttft": 1.0}},
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "tok0 tok1 tok2 "


def test_engine_failing_after_keepalive_commit_ends_with_error_event(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([s.url for _, s in engines], proxy={"sse_keepalive_s": 0.1})
    body = {"model": "fake-model", "prompt": "x", "stream": True,
            "fake": {"ttft": 1.5, "cut_after": 0}}  # fmt: skip
    resp = client.post(f"{gw.url}/v1/completions", json=body)
    assert resp.status_code == 200
    assert resp.text.startswith(": keep-alive\n\n")
    events = _events(resp.text)
    assert len(events) == 1 and json.loads(events[0])["error"]["code"] == "upstream_unavailable"
    # Committed to the first engine: no silent second attempt after bytes were sent.
    assert sum(e.requests for e, _ in engines) == 1
