"""LoRA end to end: clients -> the gateway -> enginesim engines (real processes, real sockets).

Each engine runs behind a counting relay (tests/gateway/lorasim.py), so the tests count the
load and unload calls that really reached an engine. Covered: ``/v1/models`` listing
registered adapters, on-demand loads coalesced (N concurrent first requests, one load),
the failure paths (the engine's 4xx passed through, no free slot -> 503 + retry-after, the
wait timing out), making room by unloading the least recently used idle adapter, every
concurrent request answered, an engine restart reconciled, the placement controller's
loads and idle unloads, per-key access, the admin API, and the ``openai`` SDK; a refused
adapter backing off (no load per request or round, no room made for it, loaded once its
source is fixed, afresh when re-registered); ConfigMap entries removed (unloaded from the
engines, then 404) or given another source (reloaded from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from gateway.adapters import AdapterRegistry, AdapterSpec
from gateway.app import create_app
from gateway.endpoints import EndpointRegistry, ModelCard
from gateway.lora_actuator import LoraActuator, LoraBook
from gateway.lora_loader import OnDemandLoader
from gateway.lora_metrics import LoraMetrics
from gateway.placement import DemandTracker, PlacementController
from gateway.settings import LoraSettings, Settings
from gateway.upstream import Upstream
from routing.lora import PlacementSettings
from tests.gateway.conftest import gateway_settings
from tests.gateway.lorasim import (
    MODEL,
    FakeKubeApi,
    SimEngine,
    adapter_dir,
    start_engines,
    write_kubeconfig,
)
from tests.gateway.servers import ServerThread, wait_until

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
CHAT = "/v1/chat/completions"
ADMIN_KEY = "admin-key-0123456789"


@pytest.fixture(scope="module")
def engines() -> Iterator[list[SimEngine]]:
    started = start_engines(2)
    try:
        yield started
    finally:
        for engine in started:
            engine.stop()


@pytest.fixture
def sims(engines: list[SimEngine]) -> Iterator[list[SimEngine]]:
    """The engines, with no adapter loaded, no relay delay and zeroed counts, per test."""
    for engine in engines:
        if engine.proc is None or engine.proc.poll() is not None:
            engine.start()
        engine.unload_all()
        engine.relay.calls.clear()
        engine.relay.delay.clear()
    yield engines


def _settings(sims: list[SimEngine], adapters: list[dict[str, Any]], **lora: Any) -> Settings:
    """Placement off unless ``placement_interval_s`` is given, and no preload unless
    ``placement`` says so: these tests count on-demand loads."""
    extra = {k: lora.pop(k) for k in ("api_keys", "admin_key", "discovery") if k in lora}
    lora["placement"] = {"preload": False, **lora.get("placement", {})}
    return gateway_settings(
        [e.url for e in sims],
        routing={"policy": "least-request", "scrape_interval_s": 0.1},
        lora={"adapters": adapters, "max_loras": 2, "placement_interval_s": 0, **lora},
        **extra,
    )


def _adapter(tmp_path: Path, name: str) -> dict[str, Any]:
    return {"name": name, "base_model": MODEL, "source": str(adapter_dir(tmp_path, name)),
            "rank": 8}  # fmt: skip


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _ready(gw: ServerThread, n: int = 1) -> None:
    def served() -> bool:
        r = httpx.get(f"{gw.url}/admin/engines", timeout=5,
                      headers={"authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
        return (
            r.status_code == 200 and sum(e["health"] == "healthy" for e in r.json()["engines"]) >= n
        )

    assert wait_until(served, timeout=20)


def _concurrent(
    url: str, bodies: list[dict[str, Any]], key: str | None = None
) -> list[httpx.Response]:
    headers = {"authorization": f"Bearer {key}"} if key else {}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=headers) as client:
            return list(await asyncio.gather(*(client.post(f"{url}{CHAT}", json=b)
                                               for b in bodies)))  # fmt: skip

    return asyncio.run(run())


def _metric(gw: ServerThread, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        series = head[len(name) :]
        if series and not series.startswith("{"):
            continue  # another family sharing the prefix (_bucket, _count, ...)
        if not all(f'{k}="{v}"' in series for k, v in labels.items()):
            continue
        total += float(value)
    return total


def _loads(sims: list[SimEngine]) -> int:
    return sum(e.relay.count(LOAD) for e in sims)


def test_models_list_registered_adapters_with_parent(sims: list[SimEngine], tmp_path: Path) -> None:
    sql = _adapter(tmp_path, "sql")
    with ServerThread(create_app(_settings(sims, [sql]))) as gw:
        _ready(gw, 2)
        cards = {c["id"]: c for c in httpx.get(f"{gw.url}/v1/models").json()["data"]}
        assert cards["sql"]["parent"] == MODEL and cards["sql"]["root"] == sql["source"]
        assert cards[MODEL]["parent"] is None
        one = httpx.get(f"{gw.url}/v1/models/sql").json()
        assert one["id"] == "sql" and one["parent"] == MODEL
        assert httpx.get(f"{gw.url}/v1/models/nope").status_code == 404
        assert _loads(sims) == 0 and not any(e.adapters() for e in sims)  # listed, not loaded
        assert _metric(gw, "switchyard_lora_adapters", origin="config") == 1


def test_concurrent_first_requests_share_one_load(sims: list[SimEngine], tmp_path: Path) -> None:
    for engine in sims:
        engine.relay.delay[LOAD] = 1.0  # the load is slow: every request arrives during it
    n = 12
    with ServerThread(create_app(_settings(sims, [_adapter(tmp_path, "sql")]))) as gw:
        _ready(gw, 2)
        answers = _concurrent(gw.url, [_chat("sql")] * n)
        assert [r.status_code for r in answers] == [200] * n, [r.text for r in answers]
        assert all(r.json()["model"] == "sql" for r in answers)
        assert _loads(sims) == 1  # exactly one load reached an engine
        holders = [e for e in sims if "sql" in e.adapters()]
        assert len(holders) == 1
        assert holders[0].relay.count(CHAT) == n  # all routed where it is loaded
        waited = _metric(gw, "switchyard_lora_on_demand_requests_total", outcome="loaded")
        assert 2 <= waited <= n  # several waiters shared the one load
        assert _metric(gw, "switchyard_lora_operations_total", op="load", reason="on_demand",
                       outcome="ok") == 1  # fmt: skip
        # Loaded now: the next request pays no wait and no load.
        assert httpx.post(f"{gw.url}{CHAT}", json=_chat("sql"), timeout=30).status_code == 200
        assert _loads(sims) == 1
        assert _metric(gw, "switchyard_lora_on_demand_requests_total") == waited


def test_openai_sdk_loads_an_adapter_on_first_use(sims: list[SimEngine], tmp_path: Path) -> None:
    with ServerThread(create_app(_settings(sims, [_adapter(tmp_path, "poet")]))) as gw:
        _ready(gw, 2)
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as sdk:
            assert "poet" in [m.id for m in sdk.models.list()]
            chat = sdk.chat.completions.create(
                model="poet", messages=[{"role": "user", "content": "a rhyme"}], max_tokens=6
            )
        assert chat.model == "poet" and chat.choices[0].message.content
        assert _loads(sims) == 1


def test_engine_refusal_is_passed_through_to_every_waiter(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    ghost = {"name": "ghost", "base_model": MODEL, "source": str(tmp_path / "missing")}
    for engine in sims:
        engine.relay.delay[LOAD] = 0.5
    with ServerThread(create_app(_settings(sims, [ghost]))) as gw:
        _ready(gw, 2)
        answers = _concurrent(gw.url, [_chat("ghost")] * 5)
        assert [r.status_code for r in answers] == [404] * 5  # the engine's own status
        for r in answers:
            error = r.json()["error"]
            assert error["code"] == "adapter_load_rejected"
            assert "No adapter found" in error["message"]  # the engine's message
        assert _loads(sims) == 1
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as sdk:
            with pytest.raises(openai.NotFoundError) as caught:
                sdk.chat.completions.create(
                    model="ghost", messages=[{"role": "user", "content": "x"}]
                )
        assert caught.value.code == "adapter_load_rejected"
        assert _loads(sims) == 2  # the other engine was not refused yet: it was tried
        # Both engines refused it: remembered, the next request gets the 404 at once.
        again = httpx.post(f"{gw.url}{CHAT}", json=_chat("ghost"), timeout=30)
        assert again.status_code == 404 and _loads(sims) == 2
        assert "not retried for" in again.json()["error"]["message"]
        assert "No adapter found" in again.json()["error"]["message"]
        assert _metric(gw, "switchyard_lora_on_demand_requests_total", outcome="rejected") == 7
        assert _metric(gw, "switchyard_lora_suppressed_operations_total", reason="on_demand") == 1


def test_no_free_slot_until_the_load_timeout_is_503_with_retry_after(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    adapters = [_adapter(tmp_path, n) for n in ("a", "b", "c")]
    settings = _settings(sims[:1], adapters, retry_after_s=3.0, load_timeout_s=0.6,
                         placement={"min_residency_s": 600.0})  # fmt: skip
    with ServerThread(create_app(settings)) as gw:
        _ready(gw)
        for name in ("a", "b"):  # the engine's two slots
            assert httpx.post(f"{gw.url}{CHAT}", json=_chat(name), timeout=30).status_code == 200
        r = httpx.post(f"{gw.url}{CHAT}", json=_chat("c"), timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "adapter_unavailable"
        assert r.headers["retry-after"] == "3" and r.headers["retry-after-ms"] == "3000"
        assert _loads(sims) == 2 and sims[0].adapters() == {"a", "b"}
        assert _metric(gw, "switchyard_lora_on_demand_requests_total", outcome="no_slot") == 1


def test_a_request_waits_for_a_slot_to_leave_min_residency_instead_of_a_503(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    adapters = [_adapter(tmp_path, n) for n in ("a", "b", "c")]
    settings = _settings(sims[:1], adapters, load_timeout_s=30.0,
                         placement={"min_residency_s": 1.0, "min_idle_s": 0.0})  # fmt: skip
    with ServerThread(create_app(settings)) as gw:
        _ready(gw)
        for name in ("a", "b"):  # the engine's two slots, both within min residency now
            assert httpx.post(f"{gw.url}{CHAT}", json=_chat(name), timeout=30).status_code == 200
        r = httpx.post(f"{gw.url}{CHAT}", json=_chat("c"), timeout=30)
        assert r.status_code == 200, r.text  # waited until `a` (or `b`) could make room
        held = sims[0].adapters()
        assert "c" in held and len(held) == 2, held
        assert _metric(gw, "switchyard_lora_on_demand_requests_total", outcome="no_slot") == 0
        assert _metric(gw, "switchyard_lora_operations_total", op="unload", reason="make_room",
                       outcome="ok") == 1  # fmt: skip


def test_a_full_engine_makes_room_by_unloading_the_lru_idle_adapter(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    adapters = [_adapter(tmp_path, n) for n in ("a", "b", "c")]
    settings = _settings(sims[:1], adapters,
                         placement={"min_residency_s": 0.0, "min_idle_s": 0.0})  # fmt: skip
    with ServerThread(create_app(settings)) as gw:
        _ready(gw)
        for name in ("a", "b"):
            assert httpx.post(f"{gw.url}{CHAT}", json=_chat(name), timeout=30).status_code == 200
        _idle(sims[0])
        r = httpx.post(f"{gw.url}{CHAT}", json=_chat("c"), timeout=30)
        assert r.status_code == 200, r.text
        assert sims[0].adapters() == {"b", "c"}  # a: least recently used
        assert sims[0].relay.count(UNLOAD) == 1
        assert _metric(gw, "switchyard_lora_operations_total", op="unload", reason="make_room",
                       outcome="ok") == 1  # fmt: skip


def _idle(engine: SimEngine) -> None:
    """Until the engine reports no adapter running or waiting, plus two gateway scrapes."""

    def quiet() -> bool:
        text = httpx.get(f"{engine.direct}/metrics", timeout=5).text
        lines = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
        newest = max(lines, key=lambda ln: float(ln.rsplit(" ", 1)[1]), default="")
        return 'running_lora_adapters=""' in newest and 'waiting_lora_adapters=""' in newest

    assert wait_until(quiet, timeout=10)
    wait_until(lambda: False, timeout=0.3)  # two scrape intervals: the gateway sees it too


def test_load_wait_times_out_and_the_load_still_serves_later(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    sims[0].relay.delay[LOAD] = 2.0
    settings = _settings(sims[:1], [_adapter(tmp_path, "slow")], load_timeout_s=0.2,
                         retry_after_s=1.0)  # fmt: skip
    with ServerThread(create_app(settings)) as gw:
        _ready(gw)
        answers = _concurrent(gw.url, [_chat("slow")] * 3)
        for r in answers:
            assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_load_timeout"
            assert r.headers["retry-after"] == "1"
        assert wait_until(lambda: "slow" in sims[0].adapters(), timeout=10)
        ok = httpx.post(f"{gw.url}{CHAT}", json=_chat("slow"), timeout=30)
        assert ok.status_code == 200
        assert _loads(sims) == 1  # the one load went on and serves the retry
        assert _metric(gw, "switchyard_lora_on_demand_requests_total", outcome="timeout") == 3


def test_every_concurrent_request_gets_an_answer(sims: list[SimEngine], tmp_path: Path) -> None:
    names = [f"t{i}" for i in range(6)]  # 6 adapters, 4 slots (2 engines x 2)
    settings = _settings(sims, [_adapter(tmp_path, n) for n in names],
                         placement={"min_residency_s": 600.0})  # fmt: skip
    for engine in sims:
        engine.relay.delay[LOAD] = 0.3
    with ServerThread(create_app(settings)) as gw:
        _ready(gw, 2)
        answers = _concurrent(gw.url, [_chat(n) for n in names for _ in range(3)])
        statuses = [r.status_code for r in answers]
        assert len(statuses) == 18 and set(statuses) <= {200, 503}, statuses
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "adapter_unavailable"
                assert int(r.headers["retry-after"]) >= 1
        served = {n for n, r in zip([n for n in names for _ in range(3)], answers, strict=True)
                  if r.status_code == 200}  # fmt: skip
        assert len(served) == 4 and _loads(sims) == 4
        assert sum(len(e.adapters()) for e in sims) == 4


def test_an_engine_restart_is_reconciled_and_the_adapter_loaded_again(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    engine = sims[0]
    settings = _settings([engine], [_adapter(tmp_path, "sql")], placement_interval_s=0.2)
    with ServerThread(create_app(settings)) as gw:
        _ready(gw)
        assert httpx.post(f"{gw.url}{CHAT}", json=_chat("sql"), timeout=30).status_code == 200
        assert engine.adapters() == {"sql"} and _loads(sims) == 1
        engine.kill()
        engine.start()  # same port: an empty engine (the controller may reload it at once)
        # The controller sees it vanish (recent demand) and loads it again, no request needed.
        assert wait_until(lambda: _loads(sims) == 2, timeout=20)
        assert wait_until(lambda: engine.adapters() == {"sql"}, timeout=5)
        assert _metric(gw, "switchyard_lora_reconciled_adapters_total", change="vanished") >= 1
        assert _metric(gw, "switchyard_lora_operations_total", op="load", reason="demand",
                       outcome="ok") == 1  # fmt: skip
        assert httpx.post(f"{gw.url}{CHAT}", json=_chat("sql"), timeout=30).status_code == 200


def test_an_engine_restart_without_the_controller_loads_on_demand(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    engine = sims[0]
    with ServerThread(create_app(_settings([engine], [_adapter(tmp_path, "sql")]))) as gw:
        _ready(gw)
        assert httpx.post(f"{gw.url}{CHAT}", json=_chat("sql"), timeout=30).status_code == 200
        engine.kill()
        engine.start()

        def relisted() -> bool:  # the gateway's probes saw the restart: the card is ours again
            cards = httpx.get(f"{gw.url}/v1/models", timeout=5).json()["data"]
            return any(c["id"] == "sql" and c["owned_by"] == "switchyard" for c in cards)

        assert wait_until(relisted, timeout=20)
        assert httpx.post(f"{gw.url}{CHAT}", json=_chat("sql"), timeout=30).status_code == 200
        assert engine.adapters() == {"sql"} and _loads(sims) == 2


def test_registered_adapters_are_preloaded_and_give_way_to_requested_ones(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    """The default ``placement.preload``: with no request, the controller fills the free
    slots with registered adapters; a first request for one waits for no load; a request
    for an adapter that found no free slot takes an unasked preload's slot at once (no
    minimum residency for it), never the one a request used."""
    adapters = [_adapter(tmp_path, n) for n in ("a", "b", "c")]
    settings = gateway_settings(
        [sims[0].url],
        routing={"policy": "least-request", "scrape_interval_s": 0.1},
        # load_timeout_s 5: were b protected by minimum residency (30 s), c would get a 503
        lora={"adapters": adapters, "max_loras": 2, "placement_interval_s": 0.2,
              "load_timeout_s": 5.0},
    )  # fmt: skip
    assert "preload" not in settings.lora.placement and PlacementSettings().preload
    with ServerThread(create_app(settings)) as gw:
        _ready(gw)
        assert wait_until(lambda: sims[0].adapters() == {"a", "b"}, timeout=20)  # by name
        assert _metric(gw, "switchyard_lora_operations_total", op="load", reason="preload",
                       outcome="ok") == 2  # fmt: skip
        assert httpx.post(f"{gw.url}{CHAT}", json=_chat("a"), timeout=30).status_code == 200
        assert _metric(gw, "switchyard_lora_on_demand_wait_seconds_count") == 0
        r = httpx.post(f"{gw.url}{CHAT}", json=_chat("c"), timeout=30)
        assert r.status_code == 200, r.text
        assert sims[0].adapters() == {"a", "c"}  # b, never asked for, made room (within 30 s)
        assert _metric(gw, "switchyard_lora_operations_total", op="unload", reason="make_room",
                       outcome="ok") == 1  # fmt: skip
        assert _loads(sims) == 3


def test_the_controller_unloads_an_idle_adapter(sims: list[SimEngine], tmp_path: Path) -> None:
    settings = _settings(sims[:1], [_adapter(tmp_path, "nap")], placement_interval_s=0.2,
                         placement={"idle_s": 1.0, "min_residency_s": 0.0})  # fmt: skip
    with ServerThread(create_app(settings)) as gw:
        _ready(gw)
        assert httpx.post(f"{gw.url}{CHAT}", json=_chat("nap"), timeout=30).status_code == 200
        assert wait_until(lambda: sims[0].adapters() == set(), timeout=20)
        assert sims[0].relay.count(UNLOAD) == 1
        assert _metric(gw, "switchyard_lora_operations_total", op="unload", reason="idle",
                       outcome="ok") == 1  # fmt: skip
        assert _metric(gw, "switchyard_lora_placement_decisions_total", op="unload",
                       reason="idle") == 1  # fmt: skip


def test_the_controller_leaves_hand_loaded_adapters_alone(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    sims[0].load("manual", adapter_dir(tmp_path, "manual"))
    settings = _settings(sims[:1], [], placement_interval_s=0.2, placement={"idle_s": 0.5})
    with ServerThread(create_app(settings)) as gw:
        _ready(gw)
        assert wait_until(
            lambda: _metric(gw, "switchyard_lora_reconciled_adapters_total",
                            change="appeared") >= 1, timeout=10)  # fmt: skip
        r = httpx.post(f"{gw.url}{CHAT}", json=_chat("manual"), timeout=30)
        assert r.status_code == 200  # routed as any listed adapter
        wait_until(lambda: False, timeout=1.0)  # several controller rounds
        assert sims[0].adapters() == {"manual"} and sims[0].relay.count(UNLOAD) == 0


def test_per_key_adapter_access(sims: list[SimEngine], tmp_path: Path) -> None:
    keys = [{"key": "sk-allowed-123", "adapters": ["sql"]},
            {"key": "sk-denied-1234", "adapters": []}]  # fmt: skip
    settings = _settings(sims, [_adapter(tmp_path, "sql")], api_keys=keys, admin_key=ADMIN_KEY)
    with ServerThread(create_app(settings)) as gw:
        _ready(gw, 2)

        def listed(key: str) -> set[str]:
            r = httpx.get(f"{gw.url}/v1/models", headers={"authorization": f"Bearer {key}"})
            return {c["id"] for c in r.json()["data"]}

        assert "sql" in listed("sk-allowed-123") and "sql" not in listed("sk-denied-1234")
        denied = _concurrent(gw.url, [_chat("sql")], key="sk-denied-1234")[0]
        assert denied.status_code == 404 and denied.json()["error"]["code"] == "model_not_found"
        assert _loads(sims) == 0  # a refused caller starts no load
        allowed = _concurrent(gw.url, [_chat("sql")], key="sk-allowed-123")[0]
        assert allowed.status_code == 200 and _loads(sims) == 1
        denied = _concurrent(gw.url, [_chat("sql")], key="sk-denied-1234")[0]
        assert denied.status_code == 404  # loaded now, still hidden from this key


def test_admin_api_registers_lists_and_deletes_adapters(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    settings = _settings(sims[:1], [_adapter(tmp_path, "cfg")], admin_key=ADMIN_KEY,
                         api_keys=["sk-client-123"])  # fmt: skip
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client = {"authorization": "Bearer sk-client-123"}
    with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url) as http:
        _ready(gw)
        assert http.get("/admin/adapters").status_code == 401
        assert http.get("/admin/adapters", headers=client).status_code == 403
        body = _adapter(tmp_path, "new")
        created = http.post("/admin/adapters", json=body, headers=admin)
        assert created.status_code == 201, created.text
        assert created.json()["origin"] == "admin" and created.json()["engines"] == []
        again = http.post("/admin/adapters", json=body, headers=admin)
        assert again.status_code == 400 and again.json()["error"]["param"] == "name"
        s3 = http.post("/admin/adapters", headers=admin,
                       json={**body, "name": "s3", "source": "s3://bucket/lora"})  # fmt: skip
        assert s3.status_code == 400 and s3.json()["error"]["param"] == "source"
        bad = http.post("/admin/adapters", headers=admin, json={"name": "x"})
        assert bad.status_code == 400
        listing = http.get("/admin/adapters", headers=admin).json()
        assert {a["name"]: a["origin"] for a in listing["adapters"]} == {
            "cfg": "config",
            "new": "admin",
        }
        r = http.post(CHAT, json=_chat("new"), headers=client, timeout=30)
        assert r.status_code == 200 and sims[0].adapters() == {"new"}
        assert http.get("/admin/adapters/new", headers=admin).json()["engines"] == [
            sims[0].url.removeprefix("http://")
        ]
        assert http.delete("/admin/adapters/cfg", headers=admin).status_code == 400
        assert http.delete("/admin/adapters/nope", headers=admin).status_code == 404
        gone = http.delete("/admin/adapters/new", headers=admin)
        assert gone.status_code == 200 and gone.json()["unloaded"] == [
            sims[0].url.removeprefix("http://")
        ]
        assert sims[0].adapters() == set()
        assert http.get("/admin/adapters/new", headers=admin).status_code == 404
        after = http.post(CHAT, json=_chat("new"), headers=client, timeout=30)
        assert after.status_code == 404 and after.json()["error"]["code"] == "model_not_found"


def test_admin_registration_errors_name_the_field_at_fault(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    """A name equal to its base model is the name's fault, a full registry no field's;
    both used to say ``param: "source"``."""
    settings = _settings(sims[:1], [_adapter(tmp_path, "cfg")], admin_key=ADMIN_KEY,
                         max_adapters=1)  # fmt: skip
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url) as http:
        same = http.post("/admin/adapters", headers=admin,
                         json={**_adapter(tmp_path, "x"), "name": MODEL})  # fmt: skip
        assert same.status_code == 400 and same.json()["error"]["param"] == "name", same.text
        full = http.post("/admin/adapters", json=_adapter(tmp_path, "x"), headers=admin)
        assert full.status_code == 400 and "full" in full.json()["error"]["message"], full.text
        assert full.json()["error"]["param"] is None


def test_the_controller_spreads_a_hot_adapter(sims: list[SimEngine], tmp_path: Path) -> None:
    settings = _settings(sims, [_adapter(tmp_path, "hot")], placement_interval_s=0.2,
                         rate_alpha=1.0, placement={"rate_per_replica": 0.5})  # fmt: skip
    with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url) as http:
        _ready(gw, 2)
        for _ in range(100):  # ~5 requests/s, 10x the rate one replica should take
            assert http.post(CHAT, json=_chat("hot"), timeout=30).status_code == 200
            if all("hot" in e.adapters() for e in sims):
                break
            wait_until(lambda: False, timeout=0.2)
        assert all("hot" in e.adapters() for e in sims)
        assert _loads(sims) == 2
        assert _metric(gw, "switchyard_lora_operations_total", op="load", reason="spread",
                       outcome="ok") == 1  # fmt: skip


@contextlib.contextmanager
def _configmap_gateway(
    sims: list[SimEngine], tmp_path: Path, api: FakeKubeApi
) -> Iterator[tuple[ServerThread, httpx.Client]]:
    """A gateway reading its adapters from ``api``'s ConfigMap every 0.2 s (the placement
    controller off), and a client on it; both closed on exit, then the fake API.

    Kubernetes discovery runs too (the ConfigMap needs it). Its pod watch is open and read
    before this yields (the gateway counted the fake API's BOOKMARK) and lasts 60 s, so the
    gateway never shuts down while a worker thread is opening a watch: an abandoned thread
    would open it after the shutdown's stop and leave its socket to the garbage collector
    (a ResourceWarning, an error here)."""
    with contextlib.ExitStack() as stack:
        kube = stack.enter_context(ServerThread(api))
        config = write_kubeconfig(tmp_path / "kubeconfig", kube.url)
        settings = _settings(
            sims[:1], [], configmap={"name": "loras", "refresh_s": 0.2},
            discovery={"kind": "kubernetes", "namespace": "ns", "selector": "app=none",
                       "kubeconfig": str(config), "watch_timeout_s": 60.0},
        )  # fmt: skip
        gw = stack.enter_context(ServerThread(create_app(settings)))
        http = stack.enter_context(httpx.Client(base_url=gw.url, timeout=30))
        _ready(gw)
        assert wait_until(
            lambda: _metric(gw, "switchyard_discovery_events_total", type="bookmark") == 1,
            timeout=10,
        )
        yield gw, http


def _configmap(*adapters: dict[str, Any]) -> dict[str, str]:
    lines = [f"- {{name: {a['name']}, base_model: {a['base_model']}, source: {a['source']}}}\n"
             for a in adapters]  # fmt: skip
    return {"adapters.yaml": "".join(lines)}


def _configmap_unloads(gw: ServerThread) -> float:
    return _metric(gw, "switchyard_lora_operations_total", op="unload", reason="configmap",
                   outcome="ok")  # fmt: skip


def test_adapters_from_a_configmap_are_served(sims: list[SimEngine], tmp_path: Path) -> None:
    cm = _adapter(tmp_path, "cm")
    api = FakeKubeApi()
    api.data = _configmap(cm)
    with _configmap_gateway(sims, tmp_path, api) as (gw, http):

        def listed() -> bool:
            cards = http.get("/v1/models").json()["data"]
            return any(c["id"] == "cm" for c in cards)

        assert wait_until(listed, timeout=10)
        assert "/api/v1/namespaces/ns/configmaps/loras" in api.paths
        r = http.post(CHAT, json=_chat("cm"))
        assert r.status_code == 200 and sims[0].adapters() == {"cm"}
        assert _metric(gw, "switchyard_lora_adapters", origin="configmap") == 1
        api.data = {"adapters.yaml": "[]"}  # removed from the ConfigMap: unregistered
        assert wait_until(
            lambda: _metric(gw, "switchyard_lora_adapters", origin="configmap") == 0,
            timeout=10,
        )


def test_an_adapter_removed_from_the_configmap_is_unloaded_from_the_engines(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    """Removed from the ConfigMap, an adapter used to be unregistered only: the engine kept
    it loaded and served it by name. Now the refresh unloads it there (the admin DELETE's
    path) and its requests get the unknown model's 404; the entry left alone stays."""
    gone, kept = _adapter(tmp_path, "gone"), _adapter(tmp_path, "kept")
    api = FakeKubeApi()
    api.data = _configmap(gone, kept)
    with _configmap_gateway(sims, tmp_path, api) as (gw, http):
        assert wait_until(
            lambda: _metric(gw, "switchyard_lora_adapters", origin="configmap") == 2, timeout=10
        )
        for name in ("gone", "kept"):
            r = http.post(CHAT, json=_chat(name))
            assert r.status_code == 200, r.text
        assert sims[0].adapters() == {"gone", "kept"}
        api.data = _configmap(kept)
        # The gateway counts the unload and drops the card in one step: once counted, its
        # routing no longer sees the adapter on the engine.
        assert wait_until(lambda: _configmap_unloads(gw) == 1, timeout=10)
        assert sims[0].adapters() == {"kept"}
        assert sims[0].relay.count(UNLOAD) == 1
        after = http.post(CHAT, json=_chat("gone"))
        assert after.status_code == 404, after.text
        assert after.json()["error"]["code"] == "model_not_found"
        assert http.post(CHAT, json=_chat("kept")).status_code == 200
        assert _loads(sims) == 2 and _configmap_unloads(gw) == 1


def test_an_adapter_given_another_source_in_the_configmap_is_reloaded_from_it(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    """A ConfigMap entry whose source changes is unloaded from the engine (which would
    otherwise serve the old weights under its name) and loaded from the new source by its
    next request."""
    old = _adapter(tmp_path / "v1", "moved")
    new = _adapter(tmp_path / "v2", "moved")
    api = FakeKubeApi()
    api.data = _configmap(old)
    with _configmap_gateway(sims, tmp_path, api) as (gw, http):
        assert wait_until(
            lambda: _metric(gw, "switchyard_lora_adapters", origin="configmap") == 1, timeout=10
        )
        assert http.post(CHAT, json=_chat("moved")).status_code == 200
        assert sims[0].adapter_roots() == {"moved": old["source"]}
        api.data = _configmap(new)
        assert wait_until(lambda: _configmap_unloads(gw) == 1, timeout=10)
        assert sims[0].adapters() == set()
        r = http.post(CHAT, json=_chat("moved"))
        assert r.status_code == 200, r.text
        assert sims[0].adapter_roots() == {"moved": new["source"]}
        assert _loads(sims) == 2 and _configmap_unloads(gw) == 1


def test_a_refused_adapter_backs_off_and_loads_once_its_source_is_fixed(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    engine = sims[0]
    engine.load("manual", adapter_dir(tmp_path, "manual"))  # by hand, not registered
    ghost = {"name": "ghost", "base_model": MODEL, "source": str(tmp_path / "lora-ghost")}
    settings = _settings(
        [engine], [ghost, _adapter(tmp_path, "real")], placement_interval_s=0.2,
        placement={"min_residency_s": 0.0, "min_idle_s": 0.0, "load_backoff_s": 6.0,
                   "load_backoff_max_s": 6.0},  # longer than the ~3.5 s of demand below
    )  # fmt: skip
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url) as http:
        _ready(gw)
        assert wait_until(
            lambda: _metric(gw, "switchyard_lora_reconciled_adapters_total",
                            change="appeared") >= 1, timeout=10)  # fmt: skip
        first = http.post(CHAT, json=_chat("ghost"), timeout=30)  # the free slot: refused
        assert first.status_code == 404, first.text
        assert http.post(CHAT, json=_chat("real"), timeout=30).status_code == 200  # now full
        assert _loads(sims) == 2 and engine.adapters() == {"manual", "real"}
        # 3 s of demand for it (15 controller rounds): without the backoff every round made
        # room (unloading `manual`) and loaded it again; now nothing is tried.
        for _ in range(15):
            r = http.post(CHAT, json=_chat("ghost"), timeout=30)
            assert r.status_code == 404 and "not retried for" in r.json()["error"]["message"]
            wait_until(lambda: False, timeout=0.2)
        assert _loads(sims) == 2 and engine.relay.count(UNLOAD) == 0
        assert engine.adapters() == {"manual", "real"}  # the hand-loaded one survived
        assert _metric(gw, "switchyard_lora_suppressed_operations_total", reason="demand") >= 5
        assert _metric(gw, "switchyard_lora_suppressed_operations_total", reason="on_demand") == 15
        state = http.get("/admin/adapters/ghost", headers=admin).json()
        assert state["load_state"] == "broken" and state["last_status"] == 404, state
        assert "No adapter found" in state["last_error"] and state["retry_at"] is not None
        assert list(state["failed_on"]) == [engine.url.removeprefix("http://")]
        assert http.get("/admin/adapters/real", headers=admin).json()["load_state"] == "ok"
        adapter_dir(tmp_path, "ghost")  # the source fixed: once the backoff passes, it loads

        def served() -> bool:
            return http.post(CHAT, json=_chat("ghost"), timeout=30).status_code == 200

        assert wait_until(served, timeout=20)
        assert "ghost" in engine.adapters() and _loads(sims) == 3
        assert http.get("/admin/adapters/ghost", headers=admin).json()["load_state"] == "ok"


def test_a_re_registered_adapter_is_tried_again_at_once(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    settings = _settings(sims[:1], [])
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    body = {"name": "ghost", "base_model": MODEL, "source": str(tmp_path / "lora-ghost")}
    with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url) as http:
        _ready(gw)
        assert http.post("/admin/adapters", json=body, headers=admin).status_code == 201
        for _ in range(3):
            assert http.post(CHAT, json=_chat("ghost"), timeout=30).status_code == 404
        assert _loads(sims) == 1  # refused once, then remembered
        assert http.get("/admin/adapters", headers=admin).json()["adapters"][0][
            "load_state"] == "broken"  # fmt: skip
        assert http.delete("/admin/adapters/ghost", headers=admin).status_code == 200
        adapter_dir(tmp_path, "ghost")
        assert http.post("/admin/adapters", json=body, headers=admin).status_code == 201
        assert http.post(CHAT, json=_chat("ghost"), timeout=30).status_code == 200
        assert _loads(sims) == 2


@pytest.mark.anyio
async def test_an_unload_during_the_load_disk_read_waits_and_the_book_matches_the_engine(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    """enginesim spends the adapter's simulated disk read (16 GB sparse at 2 GB/s, speed 20:
    0.4 s) before answering the load; an unload sent meanwhile would answer 404 and the
    load land after it. The actuator waits for its load, so the unload really unloads."""
    path = adapter_dir(tmp_path, "big")
    os.truncate(path / "adapter_model.safetensors", 16 * 10**9)
    spec = AdapterSpec("big", MODEL, str(path))
    reg = EndpointRegistry()
    state = reg.add(sims[0].url, endpoint_id="e1")
    state.set_models([ModelCard(MODEL)])
    state.record_probe(True, fail_threshold=1, success_threshold=1)
    settings = LoraSettings(max_loras=2, load_timeout_s=30.0, request_timeout_s=30.0)
    metrics = LoraMetrics.create(CollectorRegistry())
    book = LoraBook(default_max_loras=2)
    control = Upstream.for_control(Settings().proxy)
    actuator = LoraActuator(client=control, adapters=AdapterRegistry(specs=[spec]), book=book,
                            settings=settings, metrics=metrics)  # fmt: skip
    try:
        future = actuator.start_load(state, spec, reason="demand")
        await asyncio.sleep(0.05)  # the load is in the engine's disk read now
        await actuator.unload(state, "big", reason="idle")
        assert future.done() and future.exception() is None
        assert sims[0].adapters() == set()  # the unload came after the load: really gone
        assert "big" not in book.loaded("e1") and "big" not in {c.id for c in state.models}
        assert sims[0].relay.count(UNLOAD) == 1 and sims[0].relay.count(LOAD) == 1
        ops = metrics.operations
        assert ops.labels(op="load", reason="demand", outcome="ok")._value.get() == 1
        assert ops.labels(op="unload", reason="idle", outcome="ok")._value.get() == 1
        assert book.reconcile(reg) == (0, 0)  # the book and /v1/models agree
    finally:
        await actuator.aclose()
        await control.aclose()


def test_deleting_an_adapter_while_it_loads_leaves_it_on_no_engine(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    """DELETE unloads from the engines that list the adapter *and* from those still loading
    it: a load in flight lands after the DELETE, and used to leave the unregistered adapter
    on the engine, listed and served to every client."""
    sims[0].relay.delay[LOAD] = 1.0
    settings = _settings(sims[:1], [], admin_key=ADMIN_KEY, api_keys=["sk-client-123"])
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client = {"authorization": "Bearer sk-client-123"}
    with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url) as http:
        _ready(gw)
        body = _adapter(tmp_path, "brief")
        assert http.post("/admin/adapters", json=body, headers=admin).status_code == 201
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                httpx.post, f"{gw.url}{CHAT}", json=_chat("brief"), headers=client, timeout=30
            )
            assert wait_until(lambda: sims[0].relay.count(LOAD) == 1, timeout=10)
            gone = http.delete("/admin/adapters/brief", headers=admin, timeout=30)
            assert gone.status_code == 200, gone.text
            assert gone.json()["unloaded"] == [sims[0].url.removeprefix("http://")]
            first.result()  # its load landed (answered 200 or 404: deleted meanwhile)
        assert sims[0].adapters() == set()
        after = http.post(CHAT, json=_chat("brief"), headers=client, timeout=30)
        assert after.status_code == 404 and after.json()["error"]["code"] == "model_not_found"


def test_a_request_waiting_for_a_slot_loads_nothing_once_its_adapter_is_deleted(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    """A request waits for a slot (both held, within minimum residency); the admin deletes
    its adapter; a slot frees up. The waiter used to keep polling with the registration it
    started with and load the deleted adapter; now it gets the unknown model's 404."""
    settings = _settings(sims[:1], [_adapter(tmp_path, n) for n in ("a", "b")],
                         admin_key=ADMIN_KEY, api_keys=["sk-client-123"], load_timeout_s=20.0,
                         placement={"min_residency_s": 600.0})  # fmt: skip
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client = {"authorization": "Bearer sk-client-123"}
    with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url) as http:
        _ready(gw)
        for name in ("a", "b"):  # the engine's two slots, held for 600 s
            assert http.post(CHAT, json=_chat(name), headers=client, timeout=30).status_code == 200
        body = _adapter(tmp_path, "late")
        assert http.post("/admin/adapters", json=body, headers=admin).status_code == 201
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(
                httpx.post, f"{gw.url}{CHAT}", json=_chat("late"), headers=client, timeout=30
            )
            waiting = lambda: http.get("/admin/adapters", headers=admin).json()["placement"][  # noqa: E731
                "waiting"
            ].get("late")  # fmt: skip
            assert wait_until(lambda: waiting() == 1, timeout=10)
            assert http.delete("/admin/adapters/late", headers=admin).status_code == 200
            httpx.post(f"{sims[0].direct}{UNLOAD}", json={"lora_name": "a"}, timeout=5)
            r = waiter.result()  # a slot is free now (the next health probe shows it)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert sims[0].relay.count(LOAD) == 2 and "late" not in sims[0].adapters()


@pytest.mark.anyio
async def test_an_unload_planned_before_a_request_for_the_adapter_is_not_made(
    sims: list[SimEngine], tmp_path: Path
) -> None:
    """A round plans a (slow) load then an idle unload on one engine; a request for the
    idle adapter arrives while the load runs (routed to that engine, which lists it). The
    unload, planned before that request, used to go out all the same and pull the adapter
    from under it; now it is dropped (the next round decides again)."""
    specs = [AdapterSpec(n, MODEL, str(adapter_dir(tmp_path, n))) for n in ("old", "new")]
    reg = EndpointRegistry()
    state = reg.add(sims[0].url, endpoint_id="e1")
    state.set_models([ModelCard(MODEL)])
    state.record_probe(True, fail_threshold=1, success_threshold=1)
    settings = LoraSettings(max_loras=2, placement_interval_s=1.0)
    # no preload: "old", never requested, is to be planned for an idle unload
    placement = PlacementSettings(min_residency_s=0.0, min_idle_s=0.0, preload=False)
    metrics = LoraMetrics.create(CollectorRegistry())
    book = LoraBook(default_max_loras=2)
    adapters = AdapterRegistry(specs=specs)
    control = Upstream.for_control(Settings().proxy)
    actuator = LoraActuator(client=control, adapters=adapters, book=book, settings=settings,
                            metrics=metrics)  # fmt: skip
    demand = DemandTracker(alpha=0.3)
    loader = OnDemandLoader(endpoints=reg, actuator=actuator, settings=settings,
                            placement=placement, metrics=metrics,
                            last_used=lambda: demand.last_used)  # fmt: skip
    controller = PlacementController(endpoints=reg, adapters=adapters, actuator=actuator,
                                     loader=loader, demand=demand, settings=settings,
                                     placement=placement, metrics=metrics)  # fmt: skip
    try:
        await actuator.start_load(state, specs[0], reason="demand")  # "old": never requested
        demand.arrived("new", now=book.clock())
        sims[0].relay.delay[LOAD] = 0.5
        step = asyncio.create_task(controller.step())
        for _ in range(500):  # bounded: until the load of "new" reached the engine
            if sims[0].relay.count(LOAD) == 2:
                break
            await asyncio.sleep(0.01)
        demand.arrived("old", now=book.clock())  # a request for "old", routed to e1
        actions = await step
        assert [(a.kind, a.adapter, a.reason) for a in actions] == [
            ("load", "new", "demand"),
            ("unload", "old", "idle"),
        ]
        assert sims[0].adapters() == {"old", "new"} and sims[0].relay.count(UNLOAD) == 0
        assert {c.id for c in state.models if c.parent} == {"old", "new"}
    finally:
        await actuator.aclose()
        await control.aclose()
