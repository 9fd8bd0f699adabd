"""Fault injection (flags and ``/admin/faults``), client disconnects and cold start."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from enginesim.cluster import ClusterConfig, RunningEngine
from enginesim.core.profile import load_profile
from enginesim.server.faults import Faults
from tests.enginesim.server_harness import (
    MODEL,
    metric_families,
    running_cluster,
    sample_value,
)

POLL_S = 20.0


def _poll(check: Callable[[], bool], *, timeout_s: float = POLL_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture(scope="module")
def engine_seed() -> int:
    return 3


@pytest.fixture
def http(http: httpx.Client) -> Iterator[httpx.Client]:
    yield http
    http.post("/admin/faults", json={"clear": True})


def _running(http: httpx.Client) -> float:
    return sample_value(metric_families(http), "vllm:num_requests_running")


def _body(max_tokens: int, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": "go", "max_tokens": max_tokens, "ignore_eos": True, **extra}


def test_admin_faults_get_and_partial_update(http: httpx.Client) -> None:
    assert http.get("/admin/faults").json()["error_rate"] == 0.0
    out = http.post("/admin/faults", json={"error_rate": 0.25, "error_status": [429]}).json()
    assert (out["error_rate"], out["error_status"], out["hang"]) == (0.25, [429], False)
    out = http.post("/admin/faults", json={"hang": False}).json()
    assert out["error_rate"] == 0.25  # untouched fields keep their value
    bad = http.post("/admin/faults", json={"slowdown": 0.5})
    assert bad.status_code == 400


def test_error_rate_one_fails_every_request_with_given_status(
    http: httpx.Client, engine: RunningEngine
) -> None:
    http.post("/admin/faults", json={"error_rate": 1.0, "error_status": [503]})
    sdk = openai.OpenAI(base_url=engine.url + "/v1", api_key="x", max_retries=0)
    with sdk, pytest.raises(openai.InternalServerError) as info:
        sdk.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert info.value.status_code == 503
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "max_tokens": 1})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == 503


def test_x_return_error_header_forces_one_requests_status(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json=_body(1), headers={"X-Return-Error": "429"})
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "RateLimitError"
    bad = http.post("/v1/completions", json=_body(1), headers={"X-Return-Error": "soon"})
    assert bad.status_code == 400
    assert http.post("/v1/completions", json=_body(1)).status_code == 200


def _outcomes(seed: int) -> list[int]:
    cfg = ClusterConfig(base_port=0, speed=50.0, model=MODEL, seed=seed,
                        faults=Faults(error_rate=0.5, error_status=(429, 500)))  # fmt: skip
    with running_cluster(cfg) as engines:
        with httpx.Client(base_url=engines[0].url, timeout=30.0) as client:
            return [client.post("/v1/completions", json=_body(1)).status_code for _ in range(24)]


def test_error_injection_is_deterministic_with_seed() -> None:
    first, again, other = _outcomes(11), _outcomes(11), _outcomes(12)
    assert first == again
    assert set(first) == {200, 429, 500}
    assert first != other


def test_hang_never_answers_and_holds_no_slot(http: httpx.Client, engine: RunningEngine) -> None:
    http.post("/admin/faults", json={"hang": True})
    with httpx.Client(base_url=engine.url, timeout=0.5) as short, pytest.raises(httpx.ReadTimeout):
        short.post("/v1/completions", json=_body(2))
    http.post("/admin/faults", json={"hang": False})
    assert http.post("/v1/completions", json=_body(2)).status_code == 200
    assert _poll(lambda: http.get("/load").json() == {"server_load": 0})


def test_slowdown_stretches_simulated_step_times(http: httpx.Client) -> None:
    http.post("/admin/faults", json={"slowdown": 20.0})
    before = metric_families(http)
    assert http.post("/v1/completions", json=_body(6)).status_code == 200
    after = metric_families(http)
    name = "vllm:request_time_per_output_token_seconds"
    tpot = sample_value(after, name + "_sum") - sample_value(before, name + "_sum")
    count = sample_value(after, name + "_count") - sample_value(before, name + "_count")
    assert count == 1
    # Each decode step costs at least 20 x c0 simulated seconds.
    assert tpot >= 20 * load_profile("cpu-smollm2").c0_s


def test_crash_mid_stream_cuts_the_connection(http: httpx.Client) -> None:
    http.post("/admin/faults", json={"crash_mid_stream_after_tokens": 2})
    events: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012 - the cut comes mid-iteration
        with http.stream("POST", "/v1/completions", json=_body(50, stream=True)) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
    assert len(events) == 2 and "[DONE]" not in "".join(events)
    assert _poll(lambda: _running(http) == 0)


def test_dead_engine_health_503_and_requests_503(http: httpx.Client) -> None:
    http.post("/admin/faults", json={"dead": True})
    assert http.get("/health").status_code == 503
    resp = http.post("/v1/completions", json=_body(1))
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "EngineDeadError"
    http.post("/admin/faults", json={"dead": False})
    assert http.get("/health").status_code == 200


def test_refuse_connections_then_resume(http: httpx.Client, engine: RunningEngine) -> None:
    out = http.post("/admin/faults", json={"refuse_connections": True, "refuse_for_s": 3.0})
    assert out.json()["refuse_connections"] is True

    def refused() -> bool:
        try:
            httpx.get(engine.url + "/health", timeout=1.0)
        except httpx.ConnectError:
            return True
        return False

    assert _poll(refused, timeout_s=5.0)
    assert _poll(lambda: not refused(), timeout_s=POLL_S)
    with httpx.Client(base_url=engine.url, timeout=5.0) as fresh:
        assert fresh.get("/admin/faults").json()["refuse_connections"] is False
        assert fresh.post("/v1/completions", json=_body(1)).status_code == 200


def test_fault_flags_at_startup() -> None:
    cfg = ClusterConfig(base_port=0, speed=50.0, model=MODEL, faults=Faults(dead=True))
    with running_cluster(cfg) as engines:
        assert httpx.get(engines[0].url + "/health").status_code == 503
    cfg = ClusterConfig(base_port=0, speed=50.0, model=MODEL,
                        faults=Faults(refuse_connections=True))  # fmt: skip
    with running_cluster(cfg) as engines:
        url = engines[0].url

        def refused() -> bool:
            try:
                httpx.get(url + "/health", timeout=1.0)
            except httpx.ConnectError:
                return True
            return False

        assert _poll(refused, timeout_s=5.0)


def test_stream_disconnect_aborts_and_frees_the_slot(http: httpx.Client) -> None:
    http.post("/admin/faults", json={"slowdown": 20.0})  # the request outlives any host stall
    before = metric_families(http)
    with http.stream("POST", "/v1/completions", json=_body(2000, stream=True)) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert _running(http) == 1
    # Leaving the block closed the connection mid-stream.
    assert _poll(lambda: _running(http) == 0)
    after = metric_families(http)
    name = "vllm:request_success_total"
    aborted = sample_value(after, name, finished_reason="abort")
    assert aborted - sample_value(before, name, finished_reason="abort") == 1


def test_non_stream_disconnect_aborts_and_frees_the_slot(
    http: httpx.Client, engine: RunningEngine
) -> None:
    http.post("/admin/faults", json={"slowdown": 20.0})
    with httpx.Client(base_url=engine.url, timeout=0.3) as short, pytest.raises(httpx.ReadTimeout):
        short.post("/v1/completions", json=_body(2000))
    assert _poll(lambda: _running(http) == 0)
    assert _poll(lambda: http.get("/get_load").json() == {"load": 0})


def test_cold_start_health_and_requests_503_until_ready() -> None:
    cfg = ClusterConfig(base_port=0, speed=50.0, model=MODEL, cold_start_s=250.0)
    with running_cluster(cfg) as engines:
        url = engines[0].url
        assert httpx.get(url + "/health").status_code == 503
        resp = httpx.post(url + "/v1/completions", json=_body(1))
        assert resp.status_code == 503
        assert _poll(lambda: httpx.get(url + "/health").status_code == 200)
        assert httpx.post(url + "/v1/completions", json=_body(1)).status_code == 200
