"""Every dashboard panel's PromQL returns data from a real Prometheus.

The parts are real processes: ``switchyard kube-sim`` runs two simulated vLLM engines as
pods; ``switchyard serve`` discovers them (Kubernetes discovery), embeds the autoscaler
(static policy asking for 3 replicas with max_replicas 2: it is held at max, so the limit
series exist), enforces API-key, user and tenant limits on a real ``redis-server`` and
caps admission; a second gateway has two static engines (``python -m enginesim``) that
publish KV events (the precise prefix index) and share a KV tier in the same Redis
(``--kv-tier``; the gateway's ``kv_tier:`` looks up their residency keys for token-id
prompts: tier-aware routing), and manages LoRA adapters (``lora:``: one
loaded by hand on an engine, one registered and loaded on demand, then unloaded idle by the
placement controller, one registered with a source the engines refuse); ``prometheus``
scrapes both gateways and the four engines every second, with deploy/prometheus/rules.yaml
loaded. A short load
(streaming and not, shared prompt prefixes, engines answering 500, a stream cut mid-way,
rate-limited and unauthenticated requests, a burst the admission queue sheds, pod label
changes, a cut pod watch, token-id prompts the tier holds, then a Redis outage, which the
tier lookups see too) makes the series move. Then every panel
query (``$model``/``$engine`` once as Grafana's "All" ``.*``, once as the real model and
engine ids, ``$__rate_interval`` = 1m) must return at least one finite sample. The panel
list with its queries is written to ``$TMPDIR/switchyard-dashboard-panels.md``.
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from kubernetes import client

from tests.kube.kubehelpers import NS, engine_deployment, ready_pods
from tests.kube.simproc import KubeSimProcess
from tests.observability.dashboards import PanelQuery, panel_queries, substitute
from tests.observability.stack import EngineSimProcess, GatewayProcess, PrometheusServer, wait
from tests.redis_server import RedisServer

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yaml"
PANELS_OUT = Path(tempfile.gettempdir()) / "switchyard-dashboard-panels.md"
MODEL = "smollm2"
ADAPTER = "sql-lora"  # loaded by hand on an engine (not registered)
LORA = "chat-lora"  # registered: loaded on demand, unloaded when idle
BROKEN = "gone-lora"  # registered with a source no engine can read: every load is refused
LORA_IDLE_S = 3.0  # the controller retries the refused load (after its backoff) until then
KEY, LIMITED_KEY, ADMIN_KEY = "sk-obs-alice-0001", "sk-obs-bob-00001", "sk-obs-admin-0001"
SYSTEMS = [f"You are assistant number {i}. " + "Answer briefly and politely. " * 12
           for i in range(3)]  # fmt: skip
# token ids (tier lookups need token-mode blocks): 3 full blocks of the engines' 128 tokens
TIER_PROMPT = list(range(5000, 5000 + 3 * 128 + 10))
RATE_INTERVAL = "1m"
SETTLE_S = 20.0


@dataclass
class Stack:
    prometheus: PrometheusServer
    gateway: GatewayProcess
    engines: dict[str, str]  # engine id (pod name, or sim-i) -> metrics URL
    statuses: Counter[int]


def _gateway_settings(sim: KubeSimProcess, redis_url: str) -> dict[str, Any]:
    return {
        "discovery": {"kind": "kubernetes", "selector": "app=engine",
                      "kubeconfig": str(sim.kubeconfig), "request_timeout_s": 2.0,
                      "backoff_initial_s": 0.05},
        "health": {"interval_s": 0.2, "timeout_s": 1.0, "fail_threshold": 2,
                   "success_threshold": 1},
        "routing": {"policy": "prefix-cache", "scrape_interval_s": 0.2},
        "server": {"access_log": False},
        "proxy": {"max_attempts": 2},
        "admission": {"max_in_flight": 3, "queue_size": 1, "queue_timeout_s": 5.0},
        "redis_url": redis_url,
        "admin_key": ADMIN_KEY,
        "api_keys": [
            {"key": KEY, "name": "alice", "tenant": "acme", "rpm": 10_000, "tpm": 10_000_000,
             "user_rpm": 10_000},
            {"key": LIMITED_KEY, "name": "bob", "tenant": "beta", "rpm": 2},
        ],
        "tenants": {"acme": {"rpm": 10_000}, "beta": {"rpm": 10_000}},
        "autoscaling": {
            "enabled": True, "policy": "static", "policy_settings": {"replicas": 3},
            "max_replicas": 2, "target": {"name": "engine"},
            "kubeconfig": str(sim.kubeconfig), "interval_s": 0.2, "model": MODEL,
            "leader_election": {"lease_duration_s": 3.0, "renew_deadline_s": 2.0,
                                "retry_period_s": 0.5, "identity": "gateway-0"},
        },
    }  # fmt: skip


def _static_gateway_settings(sim: EngineSimProcess, adapter: Path,
                             redis_url: str) -> dict[str, Any]:  # fmt: skip
    """Static engines with KV events (the precise prefix index and its feeds), tier-aware
    routing on the engines' KV tier (``redis_url``: only the tier, the gateway's own state
    stays in memory) and LoRA adapters: on-demand loads, a placement controller acting
    every 0.2 s (short residency and idle times, so it unloads within the test), a refused
    load."""
    return {
        "engines": [{"url": url, "id": f"sim-{i}", "kv_events": kv}
                    for i, (url, kv) in enumerate(zip(sim.urls, sim.kv_endpoints, strict=True))],
        "health": {"interval_s": 0.2, "timeout_s": 1.0, "fail_threshold": 2,
                   "success_threshold": 1},
        "routing": {"policy": "prefix-cache", "scrape_interval_s": 0.2},
        "server": {"access_log": False},
        "kv_tier": {"enabled": True, "redis_url": redis_url, "lookup_timeout_s": 0.5},
        "lora": {
            "adapters": [{"name": LORA, "base_model": MODEL, "source": str(adapter)},
                         {"name": BROKEN, "base_model": MODEL,
                          "source": str(adapter.with_name("no-such-adapter"))}],
            "load_timeout_s": 10.0, "request_timeout_s": 5.0, "placement_interval_s": 0.2,
            # a short load backoff (0.25 s doubling to 1 s): the refused loads repeat (the
            # alert's "at least 3") and are suppressed in between (their panel)
            # no preload: LORA's loads are on demand (its panels and alerts are the subject)
            "placement": {"min_residency_s": 0.5, "min_idle_s": 0.2, "idle_s": LORA_IDLE_S,
                          "load_backoff_s": 0.25, "load_backoff_max_s": 1.0, "preload": False},
        },
    }  # fmt: skip


def _prometheus_config(gateways: list[str], engines: dict[str, str]) -> dict[str, Any]:
    """Scrape every second; the engines' targets carry ``endpoint`` = the engine id, as
    the Kubernetes scrape configuration's relabelling gives them (docs/operations.md)."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "switchyard", "static_configs": [
                {"targets": [url.removeprefix("http://") for url in gateways]}]},
            {"job_name": "vllm", "static_configs": [
                {"targets": [url.removeprefix("http://").removesuffix("/metrics")],
                 "labels": {"endpoint": pod}} for pod, url in sorted(engines.items())]},
        ],
    }  # fmt: skip


def _chat(http: httpx.Client, i: int, *, stream: bool, key: str = KEY,
          model: str = MODEL) -> int:  # fmt: skip
    body = {"model": model, "max_tokens": 6, "stream": stream, "user": f"user-{i % 3}",
            "messages": [{"role": "system", "content": SYSTEMS[i % len(SYSTEMS)]},
                         {"role": "user", "content": f"question {i}"}]}  # fmt: skip
    hdrs = {"authorization": f"Bearer {key}"}
    if not stream:
        return http.post("/v1/chat/completions", json=body, headers=hdrs).status_code
    with http.stream("POST", "/v1/chat/completions", json=body, headers=hdrs) as answer:
        for _ in answer.iter_bytes():
            pass
        return answer.status_code


def _complete_ids(http: httpx.Client) -> int:
    body = {"model": MODEL, "prompt": TIER_PROMPT, "max_tokens": 2}
    return http.post("/v1/completions", json=body).status_code


def _tier_held_blocks(gateway: GatewayProcess) -> float:
    for line in gateway.metrics().splitlines():
        if line.startswith("switchyard_kv_tier_held_blocks_total "):
            return float(line.split()[1])
    return 0.0


def _faults(engines: dict[str, str], body: dict[str, Any]) -> None:
    for url in engines.values():
        base = url.removesuffix("/metrics")
        httpx.post(f"{base}/admin/faults", json=body, timeout=5.0).raise_for_status()


def _stream_errors(gateway: GatewayProcess) -> float:
    """The gateway's ``switchyard_proxy_stream_errors_total``, all engines together."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in gateway.metrics().splitlines()
               if line.startswith("switchyard_proxy_stream_errors_total{"))  # fmt: skip


def _cut_a_stream(http: httpx.Client, gateway: GatewayProcess,
                  engines: dict[str, str]) -> None:  # fmt: skip
    """Streams cut by the engines after their first tokens, until the gateway has counted a
    stream error (the "Stream errors/s" panel's only source; its series exists from then on).

    One stream is not sure to be one: an engine may draw EOS among the first two tokens
    (p = 0.002 a token) and finish before the cut, and a stream the gateway answers without
    an engine (none healthy or routable for a moment on a loaded host) is cut nowhere. So
    the fault stays on and streams go out one at a time, bounded, until the counter moves;
    their statuses are not counted (a 5xx here must not stand in for the forced ones)."""
    before = _stream_errors(gateway)

    def counted() -> bool:
        with contextlib.suppress(httpx.TransportError):
            _chat(http, 102, stream=True)
        return _stream_errors(gateway) > before

    _faults(engines, {"crash_mid_stream_after_tokens": 2})
    try:
        wait("the gateway to count a stream cut mid-way", counted, SETTLE_S, 0.2)
    finally:
        _faults(engines, {"clear": True})


def _refused_loads_in_prometheus(static: GatewayProcess, prom: PrometheusServer) -> None:
    """Until SwitchyardLoraLoadsFailing's count arm holds: ``increase`` over 10m of the
    refused loads >= 3. ``increase`` counts only what a series gained after its first
    scrape, and the refused loads come in a burst (both engines, 0.25 s backoff): a loaded
    host scraped their series first at 3, 2 and 1 (8 refused, increase 2) and the alert never
    went pending. One more request for the refused adapter a second (a remembered 404, or
    another refused load once the backoff ends; not counted in the answers) until it holds."""
    count = ('sum by (job, instance) (increase(switchyard_lora_operations_total'
             '{op="load", outcome!="ok"}[10m])) >= 3')  # fmt: skip
    with httpx.Client(base_url=static.url, timeout=30.0) as http:

        def seen() -> bool:
            if prom.query(count):
                return True
            _chat(http, 0, stream=False, model=BROKEN)
            return False

        wait("three refused adapter loads in Prometheus", seen, 3 * SETTLE_S, 1.0)


def _load(gateway: GatewayProcess, static: GatewayProcess, sim: KubeSimProcess,
          redis: RedisServer, engines: dict[str, str], adapter: Path) -> Counter[int]:  # fmt: skip
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=static.url, timeout=30.0) as http:  # KV events flow
        for i in range(8):
            statuses[_chat(http, i, stream=i % 2 == 0)] += 1
        # a token-id prompt: the engine that computes it writes its residency keys to the
        # tier, and a repeat's lookup finds them held (tier-aware routing works)
        statuses[_complete_ids(http)] += 1
        wait(
            "the tier lookup finding the prompt's blocks held",
            lambda: _complete_ids(http) == 200 and _tier_held_blocks(static) > 0,
        )
        # a LoRA adapter on one engine: adapter routing decisions
        loaded = httpx.post(
            f"{engines['sim-0'].removesuffix('/metrics')}/v1/load_lora_adapter",
            json={"lora_name": ADAPTER, "lora_path": str(adapter)},
            timeout=10.0,
        )
        assert loaded.status_code == 200, loaded.text
        wait("the gateway to list the adapter", lambda: ADAPTER in http.get("/v1/models").text)
        for i in range(2):
            statuses[_chat(http, i, stream=False, model=ADAPTER)] += 1
        # a registered adapter no engine holds: the first request waits for its on-demand
        # load, the next ones find it loaded
        for i in range(3):
            statuses[_chat(http, i, stream=i % 2 == 0, model=LORA)] += 1
        # a registered adapter the engines refuse (404: no adapter at its source): each
        # engine is tried again after its backoff while the adapter has demand, requests in
        # between get the remembered 404
        for i in range(3):
            statuses[_chat(http, i, stream=False, model=BROKEN)] += 1
    engines = {pod: url for pod, url in engines.items() if not pod.startswith("sim-")}
    with httpx.Client(base_url=gateway.url, timeout=30.0) as http:
        with ThreadPoolExecutor(4) as pool:  # 3 in flight + 1 queued: admission waits
            for status in pool.map(lambda i: _chat(http, i, stream=i % 2 == 0), range(36)):
                statuses[status] += 1
        # every engine answers 500: upstream errors, a retry each, 5xx answers
        _faults(engines, {"error_rate": 1.0, "error_status": [500]})
        try:
            for i in range(2):
                statuses[_chat(http, 100 + i, stream=False)] += 1
        finally:
            _faults(engines, {"clear": True})
        _cut_a_stream(http, gateway, engines)
        for i in range(4):  # rpm 2: denied by the key's limit
            statuses[_chat(http, 200 + i, stream=False, key=LIMITED_KEY)] += 1
        statuses[http.get("/v1/models").status_code] += 1  # no key: 401
        with ThreadPoolExecutor(8) as pool:  # more than 3 + 1: admission sheds
            for status in pool.map(lambda i: _chat(http, i, stream=False), range(300, 308)):
                statuses[status] += 1
        core = client.CoreV1Api(sim.api())
        for pod in engines:  # watch events (MODIFIED) for discovery, routing unchanged
            core.patch_namespaced_pod(pod, NS, {"metadata": {"labels": {"observed": "yes"}}})
        sim.faults(cut_watches=True)  # discovery relists
        redis.stop()  # an outage: the link goes down, calls fail, limits fall back
        for i in range(6):
            statuses[_chat(http, 400 + i, stream=i % 2 == 0)] += 1
            time.sleep(0.2)
    with httpx.Client(base_url=static.url, timeout=30.0) as http:
        # the tier's Redis is down too: a failed lookup opens the breaker, the next ones
        # are not sent (both answer 0, routed as without a tier, served)
        for _ in range(3):
            statuses[_complete_ids(http)] += 1

    # the placement controller unloads the on-demand adapter once idle (long done by now)
    def unloaded_idle() -> bool:
        return any(line.startswith("switchyard_lora_operations_total{")
                   and 'op="unload"' in line and 'reason="idle"' in line
                   for line in static.metrics().splitlines())  # fmt: skip

    wait("the idle adapter unloaded", unloaded_idle, 2 * LORA_IDLE_S)
    # for a failure's post-mortem, next to gateway.log
    (gateway.workdir / "metrics-after-load.txt").write_text(gateway.metrics())
    return statuses


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    adapter = tmp_path_factory.mktemp("adapter") / "lora"  # what enginesim reads: its size
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(100_000))
    with (
        RedisServer() as redis,
        KubeSimProcess(tmp_path_factory.mktemp("kube-sim")) as sim,
        EngineSimProcess(
            tmp_path_factory.mktemp("enginesim"), 2, kv_events=True, kv_tier=redis.url
        ) as static,
        GatewayProcess(
            tmp_path_factory.mktemp("static"),
            _static_gateway_settings(static, adapter, redis.url),
        ) as static_gateway,
    ):
        api = client.AppsV1Api(sim.api())
        deployment = engine_deployment("engine", 2, cold_start_s=0.2)
        api.create_namespaced_deployment(NS, cast(Any, deployment))  # the wire JSON as it is
        core = client.CoreV1Api(sim.api())
        pods = wait("two ready engine pods", lambda: ready_pods(core, "engine", 2))
        engines = {
            p.metadata.name: f"http://{p.status.pod_ip}:"
            f"{p.metadata.annotations['switchyard.io/port']}/metrics"
            for p in pods
        }
        engines |= {f"sim-{i}": f"{url}/metrics" for i, url in enumerate(static.urls)}
        workdir = tmp_path_factory.mktemp("gateway")
        with GatewayProcess(workdir, _gateway_settings(sim, redis.url)) as gateway:
            wait("every engine healthy", lambda: all(
                f'switchyard_endpoint_healthy_ratio{{endpoint="{e}"}} 1.0'
                in (static_gateway if e.startswith("sim-") else gateway).metrics()
                for e in engines))  # fmt: skip
            prom_dir = tmp_path_factory.mktemp("prometheus")
            config = _prometheus_config([gateway.url, static_gateway.url], engines)
            with PrometheusServer(prom_dir, config) as prometheus:
                wait("prometheus scraping every target", lambda: len(
                    prometheus.query('up == 1')) == 2 + len(engines))  # fmt: skip
                statuses = _load(gateway, static_gateway, sim, redis, engines, adapter)
                # A series first exported mid-load: its panel's rate needs two scrapes of it
                # (a scrape may time out on a loaded host; the bound allows for that).
                wait("the stream errors in Prometheus", lambda: _finite(prometheus.query(
                    "rate(switchyard_proxy_stream_errors_total[1m])")), 3 * SETTLE_S)  # fmt: skip
                _refused_loads_in_prometheus(static_gateway, prometheus)
                yield Stack(prometheus, gateway, engines, statuses)


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def _evaluate(prom: PrometheusServer, queries: list[PanelQuery], *, model: str,
              engine: str) -> dict[PanelQuery, str]:  # fmt: skip
    """The queries that return no finite sample, with why."""
    failed = {}
    for pq in queries:
        expr = substitute(pq.expr, model=model, engine=engine, rate_interval=RATE_INTERVAL)
        result = prom.query(expr)
        if not _finite(result):
            failed[pq] = f"{expr}\n    -> {result[:3]}"
    return failed


def _write_panel_list(queries: list[PanelQuery], series: dict[PanelQuery, int]) -> None:
    lines = ["| dashboard | panel | ref | series | query |", "|---|---|---|---|---|"]
    for pq in queries:
        expr = pq.expr.replace("|", "\\|")
        lines.append(f"| {pq.dashboard} | {pq.title} | {pq.ref_id} | {series[pq]} | `{expr}` |")
    PANELS_OUT.write_text("\n".join(lines) + "\n")


def test_the_load_produced_every_kind_of_answer(stack: Stack) -> None:
    s = stack.statuses
    assert s[200] >= 41 and s[429] >= 2 and s[401] == 1, s
    assert s[404] == 3, s  # the refused adapter loads: the engine's 404 passed through
    assert s[500] + s[502] + s[503] >= 2, s  # the forced error and the shed burst


def test_the_tier_lookups_reached_prometheus(stack: Stack) -> None:
    """The static gateway's tier lookups: answered by Redis and finding the blocks the
    engines wrote, skipped for chat prompts (byte blocks), and during the outage failed
    (an error, then the open breaker) instead of waiting."""
    prom = stack.prometheus

    def outcomes() -> dict[str, float]:
        result = prom.query("sum by (outcome) (switchyard_kv_tier_lookup_requests_total)")
        got = {r["metric"]["outcome"]: float(r["value"][1]) for r in result}
        return got if got.get("error", 0) + got.get("breaker", 0) >= 3 else {}

    got = wait("the outage's tier lookups in Prometheus", outcomes, SETTLE_S)
    assert got["redis"] >= 1 and got["skipped"] >= 8 and got["error"] >= 1, got
    held = prom.query("sum(switchyard_kv_tier_held_blocks_total)")
    assert float(held[0]["value"][1]) >= 3, held  # the prompt's 3 full blocks, at least once


def test_every_panel_query_returns_data(stack: Stack) -> None:
    queries = panel_queries()
    assert len(queries) >= 60
    prom = stack.prometheus
    real_engines = "|".join(sorted(stack.engines))
    # A metric scraped after the load's end: Prometheus has caught up with it.
    wait("the Redis outage in Prometheus",
         lambda: prom.query("switchyard_redis_healthy_ratio == 0"), SETTLE_S)  # fmt: skip
    failed: dict[PanelQuery, str] = {}
    deadline = time.monotonic() + SETTLE_S
    while True:
        failed = _evaluate(prom, queries, model=".*", engine=".*")
        failed |= _evaluate(prom, queries, model=MODEL, engine=real_engines)
        if not failed or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    series = {pq: len(prom.query(substitute(pq.expr, model=".*", engine=".*",
                                            rate_interval=RATE_INTERVAL)))
              for pq in queries}  # fmt: skip
    _write_panel_list(queries, series)
    print(f"\n{len(queries)} panel queries, list in {PANELS_OUT}")
    assert not failed, "panel queries without data:\n" + "\n".join(
        f"{pq.dashboard} / {pq.title} [{pq.ref_id}]: {why}" for pq, why in failed.items()
    )


def test_the_variables_list_real_values(stack: Stack) -> None:
    """``label_values(metric, label)``, as Grafana asks Prometheus for it."""
    prom = stack.prometheus
    models = prom.get("/api/v1/label/model/values",
                      **{"match[]": "switchyard_proxy_requests_total"})  # fmt: skip
    assert models == sorted([MODEL, ADAPTER, LORA])  # an adapter request counts under its name
    engines = prom.get("/api/v1/label/endpoint/values",
                       **{"match[]": "switchyard_endpoint_healthy_ratio"})  # fmt: skip
    assert sorted(engines) == sorted(stack.engines)
    vllm = prom.get("/api/v1/label/endpoint/values", **{"match[]": "vllm:num_requests_running"})
    assert sorted(vllm) == sorted(stack.engines)


def test_the_alert_rules_evaluate_on_the_real_series(stack: Stack) -> None:
    """Every rule evaluates without error on the real series, every metric it names is
    exported; the autoscaler held at max_replicas, the Redis outage and the refused adapter
    loads make SwitchyardAutoscalerAtMax, SwitchyardRedisDegraded and
    SwitchyardLoraLoadsFailing pending (their ``for`` keeps them from firing here), and the
    alerts about healthy engines stay silent."""
    prom = stack.prometheus
    names = set(prom.get("/api/v1/label/__name__/values"))
    groups = prom.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 8
    for rule in rules:
        assert rule["health"] == "ok", rule
        for metric in _metric_names(rule["query"]):
            assert metric in names, (rule["name"], metric)

    def active() -> set[str]:
        return {a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["alerts"]}

    expected = {"SwitchyardAutoscalerAtMax", "SwitchyardRedisDegraded",
                "SwitchyardLoraLoadsFailing"}  # fmt: skip
    # Bounded, with room for a loaded host (a full `make unit` under coverage is slower).
    try:
        wait(f"{expected} pending", lambda: expected <= active(), 3 * SETTLE_S, 0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; missing {sorted(expected - active())}") from None
    # the engines stayed healthy, unejected, with room, and fast
    quiet = {"SwitchyardNoHealthyEngine", "SwitchyardEngineEjected",
             "SwitchyardKVCacheNearFull", "SwitchyardTTFTOverSLO"}  # fmt: skip
    assert not quiet & active(), active()


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(switchyard_[a-z_]+|vllm:[a-z_:]+)", expr))
