"""The ``services=`` seam (a test-built container and a request observer), the concurrency
guard and the whole-request deadline."""

from __future__ import annotations

import json
from contextlib import ExitStack

import httpx

from gateway.app import create_app
from gateway.exchange import FinishedRequest
from gateway.services import Services
from tests.gateway.conftest import StartEngines, StartGateway, gateway_settings
from tests.gateway.servers import ServerThread, wait_until

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


class Recorder:
    def __init__(self) -> None:
        self.records: list[FinishedRequest] = []

    def on_request_finished(self, record: FinishedRequest) -> None:
        self.records.append(record)


def test_observer_sees_every_finished_request(
    start_engines: StartEngines, stack: ExitStack
) -> None:
    ((_, srv),) = start_engines(1)
    settings = gateway_settings([srv.url])
    recorder = Recorder()
    services = Services.build(settings, observers=(recorder,))
    for state in services.endpoints:
        state.record_probe(True, fail_threshold=1, success_threshold=1)
    gw = stack.enter_context(ServerThread(create_app(settings, services=services)))
    url = f"{gw.url}/v1/chat/completions"
    with httpx.Client(timeout=10) as client:
        client.post(url, json={**CHAT, "max_tokens": 4})
        body = {**CHAT, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
        client.post(url, json=body, headers={"x-request-id": "stream-1"})
        client.post(url, json={**CHAT, "fake": {"status": 400}})
        with client.stream("POST", url, json={**CHAT, "stream": True, "fake": {"itl": 1}}) as r:
            chunks = r.iter_raw()
            next(chunks)
    assert wait_until(lambda: len(recorder.records) == 4)
    plain, streamed, rejected, dropped = recorder.records
    assert (
        plain.outcome == "ok" and plain.usage is not None and plain.usage["completion_tokens"] == 4
    )
    assert plain.ttft_s is None and not plain.stream
    assert streamed.request_id == "stream-1" and streamed.ttft_s is not None
    assert streamed.usage is not None and streamed.usage["completion_tokens"] == 3
    assert streamed.prompt_tokens_estimate == 2  # "hello" is 5 chars -> 2 tokens at 4 chars/token
    assert rejected.status == 400 and rejected.usage is None
    assert dropped.outcome == "client_disconnect" and dropped.status == 499
    assert {r.endpoint_id for r in recorder.records} == {srv.url.removeprefix("http://")}


def test_concurrency_guard_answers_503_envelope_and_spares_probes(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url], server={"max_concurrent_requests": 1})
    url = f"{gw.url}/v1/chat/completions"
    with httpx.Client(timeout=10) as other:
        with other.stream("POST", url, json={**CHAT, "stream": True, "fake": {"itl": 0.5}}) as r:
            chunks = r.iter_raw()
            next(chunks)
            resp = client.post(url, json=CHAT)
            assert resp.status_code == 503
            assert resp.json()["error"]["code"] == "server_is_overloaded"
            assert resp.headers["retry-after"] == "1"
            assert client.get(f"{gw.url}/ready").status_code == 200
    assert wait_until(lambda: client.post(url, json=CHAT).status_code == 200)


def test_whole_request_deadline(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url], proxy={"total_timeout_s": 0.5})
    url = f"{gw.url}/v1/chat/completions"
    resp = client.post(url, json={**CHAT, "fake": {"hang": True}})
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
    resp = client.post(url, json={**CHAT, "stream": True, "max_tokens": 50, "fake": {"itl": 0.1}})
    events = [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]
    assert "deadline" in json.loads(events[-1])["error"]["message"]
    assert "[DONE]" not in events
