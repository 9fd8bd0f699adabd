"""Routing policies through the gateway, the model list, health transitions and the admin API."""

from __future__ import annotations

import urllib.parse
from collections import Counter

import httpx

from routing import WANTED_SERIES
from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.servers import wait_until

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def _served_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.headers["x-switchyard-endpoint"]


def test_round_robin_alternates(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([srv.url for _, srv in engines])
    seen = [_served_by(client.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(6)]
    assert len(set(seen)) == 2
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))
    assert client.get(f"{gw.url}/v1/chat/completions").status_code == 405


def test_policy_header_selects_least_request(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([srv.url for _, srv in engines])
    url = f"{gw.url}/v1/chat/completions"
    slow = {**CHAT, "stream": True, "max_tokens": 20, "fake": {"itl": 0.3}}
    headers = {"x-switchyard-routing": "least-request"}
    with httpx.Client(timeout=30) as other, other.stream("POST", url, json=slow) as stream:
        busy = stream.headers["x-switchyard-endpoint"]
        chunks = stream.iter_raw()  # keep a reference: a dropped iterator closes the stream
        next(chunks)
        for _ in range(4):
            resp = client.post(url, json=CHAT, headers=headers)
            assert _served_by(resp) != busy
            assert resp.headers["x-switchyard-route"].startswith("least-request;")


def test_random_policy_spreads(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(3)
    gw = start_gateway([srv.url for _, srv in engines], routing={"policy": "random"})
    counts = Counter(
        _served_by(client.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(30)
    )
    assert len(counts) == 3


def test_models_union_and_adapter_routing(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    engines[0][0].adapters = {"lora-a": "fake-model"}
    engines[1][0].models = ["fake-model", "other-model"]
    gw = start_gateway([srv.url for _, srv in engines])
    assert wait_until(lambda: len(client.get(f"{gw.url}/v1/models").json()["data"]) == 3)
    listing = client.get(f"{gw.url}/v1/models").json()
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert set(by_id) == {"fake-model", "lora-a", "other-model"}
    assert by_id["lora-a"]["parent"] == "fake-model"
    assert client.get(f"{gw.url}/v1/models/lora-a").json()["id"] == "lora-a"
    a_host = engines[0][1].url.removeprefix("http://")
    for _ in range(4):
        resp = client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "lora-a"})
        assert _served_by(resp) == a_host
    for _ in range(4):
        resp = client.post(f"{gw.url}/v1/completions", json={"model": "other-model", "prompt": "x"})
        assert _served_by(resp) != a_host
        assert resp.json()["object"] == "text_completion"


def test_embeddings_pass_through(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    body = {"model": "fake-model", "input": ["a", "b"], "encoding_format": "base64"}
    resp = client.post(f"{gw.url}/v1/embeddings", json=body)
    assert resp.status_code == 200 and resp.json()["object"] == "list"
    assert engine.bodies[-1] == httpx.Request("POST", "/", json=body).content


def test_unhealthy_engine_leaves_and_returns(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([srv.url for _, srv in engines])
    sick, sick_srv = engines[0]
    sick_host = sick_srv.url.removeprefix("http://")

    def health_of(host: str) -> str:
        ready = client.get(f"{gw.url}/ready").json()
        return str(next(e["health"] for e in ready["engines"] if e["id"] == host))

    sick.health_status = 503
    assert wait_until(lambda: health_of(sick_host) == "unhealthy")
    before = sick.requests
    for _ in range(4):
        assert _served_by(client.post(f"{gw.url}/v1/chat/completions", json=CHAT)) != sick_host
    assert sick.requests == before
    ready = client.get(f"{gw.url}/ready")
    assert ready.status_code == 200 and ready.json()["healthy_engines"] == 1  # the other one
    sick.health_status = 200
    assert wait_until(lambda: health_of(sick_host) == "healthy")
    seen = {_served_by(client.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(4)}
    assert sick_host in seen
    metrics = client.get(f"{gw.url}/metrics").text
    labels = f'{{endpoint="{sick_host}",state="unhealthy"}}'
    assert f"switchyard_endpoint_health_transitions_total{labels} 1.0" in metrics


def test_admin_adds_and_removes_engines(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([engines[0][1].url])
    new_url = engines[1][1].url
    resp = client.post(f"{gw.url}/admin/engines", json={"url": new_url, "id": "second"})
    assert resp.status_code == 201 and resp.json()["health"] == "healthy"
    assert (
        client.post(f"{gw.url}/admin/engines", json={"url": new_url, "id": "second"}).status_code
        == 400
    )  # noqa: E501
    assert client.post(f"{gw.url}/admin/engines", json={"url": "ftp://x"}).status_code == 400
    seen = {_served_by(client.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(4)}
    assert "second" in seen
    first_id = engines[0][1].url.removeprefix("http://")
    assert client.delete(f"{gw.url}/admin/engines/{first_id}").status_code == 200
    assert client.delete(f"{gw.url}/admin/engines/{first_id}").status_code == 404
    seen = {_served_by(client.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(4)}
    assert seen == {"second"}
    listed = client.get(f"{gw.url}/admin/engines").json()["engines"]
    assert [e["id"] for e in listed] == ["second"]


def test_metrics_exposition(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True})
    client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "nope"})
    text = client.get(f"{gw.url}/metrics").text
    host = srv.url.removeprefix("http://")
    for needle in (
        f'switchyard_proxy_requests_total{{endpoint="{host}",model="fake-model",status="200"}} 1.0',
        "switchyard_proxy_request_duration_seconds_bucket",
        "switchyard_proxy_time_to_first_token_seconds_count",
        "switchyard_routing_endpoint_decisions_total"
        f'{{endpoint="{host}",policy="round-robin"}} 1.0',
        'switchyard_routing_decisions_total{outcome="cold",policy="round-robin"} 1.0',
        f'switchyard_endpoint_healthy_ratio{{endpoint="{host}"}} 1.0',
    ):
        assert needle in text, needle
    assert 'model="nope"' not in text  # unknown models never become label values


def test_model_ids_with_slashes_and_unhealthy_only_models(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    engines[0][0].models = ["org/model-a"]
    engines[1][0].models = ["org/model-b"]
    gw = start_gateway([srv.url for _, srv in engines])
    assert client.get(f"{gw.url}/v1/models/org/model-a").json()["id"] == "org/model-a"
    body = {**CHAT, "model": "org/model-b"}
    assert client.post(f"{gw.url}/v1/chat/completions", json=body).status_code == 200
    engines[1][0].health_status = 503
    engine_b = engines[1][1].url.removeprefix("http://")

    def b_health() -> str:
        ready = client.get(f"{gw.url}/ready").json()
        return str(next(e["health"] for e in ready["engines"] if e["id"] == engine_b))

    assert wait_until(lambda: b_health() == "unhealthy")
    # Known model, but only on an unhealthy engine: 503 (try later), not 404.
    resp = client.post(f"{gw.url}/v1/chat/completions", json=body)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_healthy_endpoint"
    assert "org/model-b" not in [m["id"] for m in client.get(f"{gw.url}/v1/models").json()["data"]]
    assert client.get(f"{gw.url}/v1/models/org/model-b").status_code == 404


def _vllm_metrics(kv: float, waiting: int) -> str:
    return (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{model_name="fake-model"}} {kv}\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="fake-model"}} {waiting}\n'
    )


def test_scraped_kv_usage_steers_least_kv_cache_and_bad_pages_are_counted(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    engines[0][0].metrics_text = _vllm_metrics(0.9, 3)
    engines[1][0].metrics_text = _vllm_metrics(0.1, 0)
    full, free = (srv.url.removeprefix("http://") for _, srv in engines)
    gw = start_gateway(
        [srv.url for _, srv in engines],
        routing={"policy": "least-kv-cache", "scrape_interval_s": 0.05},
    )
    url = f"{gw.url}/v1/chat/completions"
    assert {_served_by(client.post(url, json=CHAT)) for _ in range(6)} == {free}
    text = client.get(f"{gw.url}/metrics").text
    assert f'switchyard_endpoint_waiting_requests{{endpoint="{full}"}} 3.0' in text
    # This fake has no filtered /metrics/ path: after one 404 there the scraper asks for the
    # whole /metrics page, uncompressed, and keeps asking there.
    asks = engines[0][0].metrics_asks
    assert [path for path, _, _ in asks].count("/metrics/") <= 1 and asks[-1][0] == "/metrics"
    assert asks[-1][1] == b"" and asks[-1][2]["accept-encoding"] == "identity"
    assert f'switchyard_endpoint_kv_usage_ratio{{endpoint="{full}"}} 0.9' in text
    # The pages swap: routing follows within a few scrape intervals.
    engines[0][0].metrics_text = _vllm_metrics(0.1, 0)
    engines[1][0].metrics_text = _vllm_metrics(0.95, 0)
    assert wait_until(lambda: _served_by(client.post(url, json=CHAT)) == full)
    # An unparsable page is counted and the last good values are kept.
    engines[0][0].metrics_text = "vllm:kv_cache_usage_perc{{{ nonsense"
    needle = f'switchyard_scrape_errors_total{{endpoint="{full}",kind="parse_error"}}'
    assert wait_until(lambda: needle in client.get(f"{gw.url}/metrics").text)
    assert _served_by(client.post(url, json=CHAT)) == full


def test_scraper_asks_the_filtered_path_for_the_routing_series_only(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    [(engine, srv)] = start_engines(1)
    engine.metrics_text = _vllm_metrics(0.4, 2)
    engine.metrics_paths = ("/metrics", "/metrics/")
    gw = start_gateway([srv.url], routing={"scrape_interval_s": 0.05})
    needle = (
        f'switchyard_endpoint_waiting_requests{{endpoint="{srv.url.removeprefix("http://")}"}} 2.0'
    )
    assert wait_until(lambda: needle in client.get(f"{gw.url}/metrics").text)
    assert wait_until(lambda: len(engine.metrics_asks) >= 3)
    for path, query, headers in engine.metrics_asks:
        assert path == "/metrics/" and headers["accept-encoding"] == "identity"
        assert urllib.parse.parse_qs(query.decode()) == {"name[]": list(WANTED_SERIES)}
