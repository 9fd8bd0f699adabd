"""LoRA parts one at a time: the registry and its sources, the ConfigMap reader (against a
fake API server on a real socket, through the official client), the demand tracker, the
book of what engines hold, engine answers, errors, settings, and on-demand waits whose
client leaves or whose gateway shuts down."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from gateway.adapter_source import ConfigMapAdapters, parse_adapters
from gateway.adapters import AdapterConflict, AdapterRegistry, AdapterSpec, LocalSources, Origin
from gateway.endpoints import EndpointRegistry, EndpointState, ModelCard
from gateway.errors import (
    AdapterLoadFailed,
    AdapterLoadTimeout,
    AdapterRejected,
    GatewayError,
    ShuttingDown,
    UpstreamTimeout,
    error_headers,
)
from gateway.lora_actuator import BEFORE_US, LoadBackoff, LoraActuator, LoraBook, _message
from gateway.lora_loader import OnDemandLoader
from gateway.lora_metrics import LoraMetrics
from gateway.placement import DemandTracker, PlacementController
from gateway.settings import DiscoverySettings, LoraConfigMapSettings, LoraSettings, Settings
from gateway.shutdown import InFlight
from gateway.upstream import Upstream
from gateway.workers import worker_settings
from routing.lora import PlacementAction, PlacementSettings, choose_for_load
from routing.metrics_parser import EngineMetrics
from tests.gateway.lorasim import FakeKubeApi, write_kubeconfig
from tests.gateway.servers import ServerThread, wait_until

# -- registry ------------------------------------------------------------------------------


def _spec(name: str, origin: Origin = Origin.ADMIN, source: str = "/m/x") -> AdapterSpec:
    return AdapterSpec(name, "base", source, 8, origin)


def test_registry_add_get_remove_by_origin() -> None:
    reg = AdapterRegistry(specs=[_spec("cfg", Origin.CONFIG)])
    reg.add(_spec("a"))
    assert reg.get("a") == _spec("a") and "a" in reg and len(reg) == 2
    with pytest.raises(AdapterConflict):
        reg.add(_spec("a"))
    with pytest.raises(AdapterConflict, match="config"):
        reg.remove("cfg")
    with pytest.raises(KeyError):
        reg.remove("nope")
    before = reg.version
    assert reg.remove("a").name == "a" and reg.get("a") is None and reg.version == before + 1
    assert reg.count(Origin.CONFIG) == 1 and reg.count(Origin.ADMIN) == 0


def test_registry_refuses_bad_entries() -> None:
    reg = AdapterRegistry(max_adapters=1)
    with pytest.raises(ValueError, match="differ"):
        reg.add(AdapterSpec("base", "base", "/m/x"))
    with pytest.raises(ValueError, match="absolute"):
        reg.add(_spec("rel", source="models/x"))
    reg.add(_spec("one"))
    with pytest.raises(ValueError, match="full"):
        reg.add(_spec("two"))


def test_registry_sync_replaces_one_origin_only() -> None:
    reg = AdapterRegistry(specs=[_spec("admin1"), _spec("cfg", Origin.CONFIG)])
    cm = Origin.CONFIGMAP
    changed, removed = reg.sync(cm, [_spec("x", cm), _spec("y", cm), _spec("cfg", cm)])
    assert changed == ["x", "y"] and removed == []
    assert reg.get("cfg") is not None and reg.get("cfg").origin is Origin.CONFIG  # type: ignore[union-attr]
    changed, removed = reg.sync(cm, [_spec("x", cm, source="/m/new"), _spec("bad", cm, "rel")])
    assert changed == ["x"] and removed == ["y"]  # the invalid entry is skipped
    assert reg.get("x").source == "/m/new"  # type: ignore[union-attr]
    version = reg.version
    assert reg.sync(cm, [_spec("x", cm, source="/m/new")]) == ([], [])
    assert reg.version == version  # no change, no new version


def test_adapters_held_before_the_book_first_looked_are_past_residency() -> None:
    """A gateway restart or a worker without the controller: what an engine already listed
    the first time this process saw its model list was loaded before it looked (its
    preloads, say) and must not hold a slot for min_residency_s; what appears later does."""
    now = [500.0]
    book = LoraBook(clock=lambda: now[0], default_max_loras=2)
    reg = _engines()
    e1, e2 = reg.get("e1"), reg.get("e2")
    assert e1 is not None and e2 is not None
    e1.set_models([ModelCard("base"), ModelCard("old", parent="base")])
    e2.set_models([])  # not probed yet
    book.reconcile(reg)
    e2.set_models([ModelCard("base"), ModelCard("there", parent="base")])  # first seen now
    now[0] = 510.0
    e1.set_models([ModelCard("base"), ModelCard("old", parent="base"),
                   ModelCard("new", parent="base")])  # fmt: skip
    assert book.reconcile(reg) == (2, 0)
    slots = {s.engine_id: s for s in book.slots(reg, last_used={})}
    assert slots["e1"].loaded == {"old": 500.0 - BEFORE_US, "new": 510.0}
    assert slots["e2"].loaded == {"there": 510.0 - BEFORE_US}
    settings = PlacementSettings(min_residency_s=30.0, min_idle_s=5.0)
    # e1 full: "old" makes room at once, "new" (appeared since) keeps its residency
    assert choose_for_load("x", "base", [slots["e1"]], now=now[0], settings=settings) == (
        PlacementAction("unload", "old", "e1", "make_room"),
        PlacementAction("load", "x", "e1", "on_demand"),
    )


def test_book_marks_preloads_until_a_request_asks_for_them() -> None:
    book = LoraBook(default_max_loras=4)
    reg = _engines()
    e1 = reg.get("e1")
    assert e1 is not None
    e1.set_models([ModelCard("base"), *(ModelCard(a, parent="base") for a in "pqr")])
    book.reconcile(reg)
    book.mark_loaded("e1", "p", preload=True)
    book.mark_loaded("e1", "q", preload=True)
    book.mark_loaded("e1", "r")

    def preloaded(last_used: dict[str, float]) -> frozenset[str]:
        (slots,) = [s for s in book.slots(reg, last_used=last_used) if s.engine_id == "e1"]
        return slots.preloaded

    assert preloaded({}) == {"p", "q"}
    assert preloaded({"p": 1.0}) == {"q"}  # a request asked for p
    book.mark_loaded("e1", "q")  # loaded again for another reason
    assert preloaded({}) == {"p"}
    book.mark_unloaded("e1", "p")
    book.mark_loaded("e1", "q", preload=True)
    assert preloaded({}) == {"q"}
    e1.set_models([ModelCard("base"), ModelCard("r", parent="base")])  # q vanished
    book.reconcile(reg)
    e1.set_models([ModelCard("base"), ModelCard("q", parent="base"), ModelCard("r", parent="base")])
    book.reconcile(reg)  # q back, loaded by someone else: not our preload
    assert preloaded({}) == frozenset()


@pytest.mark.parametrize(
    ("source", "path"),
    [("/models/sql", "/models/sql"), ("file:///models/a%20b", "/models/a b"),
     ("file://localhost/m/x", "/m/x")],
)  # fmt: skip
def test_local_sources_accept_absolute_paths(source: str, path: str) -> None:
    spec = AdapterSpec("a", "base", source)
    LocalSources().check(source)
    assert asyncio.run(LocalSources().lora_path(spec)) == path


@pytest.mark.parametrize(
    ("source", "why"),
    [("models/x", "absolute"), ("s3://bucket/x", "SourceResolver"),
     ("file://host/x", "no host"), ("hf://org/x", "SourceResolver")],
)  # fmt: skip
def test_local_sources_refuse_what_engines_cannot_read(source: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        LocalSources().check(source)


def test_card_has_parent_and_root() -> None:
    card = _spec("a").card()
    assert (card["id"], card["parent"], card["root"], card["object"]) == ("a", "base", "/m/x",
                                                                          "model")  # fmt: skip


# -- ConfigMap -----------------------------------------------------------------------------


def test_parse_adapters() -> None:
    text = (
        "- {name: a, base_model: m, source: /x, rank: 8}\n- {name: b}\n"
        "- {name: c, base_model: m, source: /y}\n"
    )
    specs = parse_adapters(text)
    cm = Origin.CONFIGMAP
    assert [(s.name, s.rank, s.origin) for s in specs] == [("a", 8, cm), ("c", None, cm)]
    assert parse_adapters("") == []
    with pytest.raises(ValueError, match="list"):
        parse_adapters("name: a")


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[FakeKubeApi, Path]]:
    api = FakeKubeApi()
    with ServerThread(api) as srv:
        yield api, write_kubeconfig(tmp_path / "kubeconfig", srv.url)


def test_configmap_adapters_follow_the_configmap(kube: tuple[FakeKubeApi, Path]) -> None:
    api, config = kube
    registry = AdapterRegistry(specs=[_spec("mine")])
    discovery = DiscoverySettings(kind="kubernetes", selector="app=e", namespace="ns",
                                  kubeconfig=config)  # fmt: skip
    source = ConfigMapAdapters(LoraConfigMapSettings(name="loras"), discovery, registry)
    try:
        api.data = {"adapters.yaml": "- {name: a, base_model: m, source: /a}\n"
                                     "- {name: mine, base_model: m, source: /b}\n"}  # fmt: skip
        assert asyncio.run(source.refresh())
        assert api.paths[-1] == "/api/v1/namespaces/ns/configmaps/loras"
        assert registry.get("a") is not None and registry.get("a").origin is Origin.CONFIGMAP  # type: ignore[union-attr]
        assert registry.get("mine").origin is Origin.ADMIN  # type: ignore[union-attr]
        api.status = 500  # an API failure keeps the last good list
        assert not asyncio.run(source.refresh()) and source.errors == 1
        assert registry.get("a") is not None
        api.status, api.data = 200, {"adapters.yaml": "not: a list"}
        assert not asyncio.run(source.refresh()) and registry.get("a") is not None
        api.data = None  # the ConfigMap deleted: no entries
        assert asyncio.run(source.refresh())
        assert registry.get("a") is None and registry.get("mine") is not None
        assert source.reads == 2
    finally:
        source.close()


def test_configmap_entries_removed_or_moved_are_handed_to_unload(
    kube: tuple[FakeKubeApi, Path],
) -> None:
    """After the sync, entries gone from the ConfigMap and entries with another source or
    base model go to ``unload`` (the admin DELETE's path, LoraManager.unload_everywhere);
    unchanged entries, a changed rank, new entries, other origins and failed reads do not."""
    api, config = kube
    registry = AdapterRegistry(specs=[_spec("mine")])
    calls: list[tuple[str, AdapterSpec | None]] = []

    async def unload(name: str) -> None:
        calls.append((name, registry.get(name)))  # the registry as the unload sees it

    def entries(*items: str) -> dict[str, str]:
        return {"adapters.yaml": "".join(f"- {{{item}}}\n" for item in items)}

    discovery = DiscoverySettings(kind="kubernetes", selector="app=e", namespace="ns",
                                  kubeconfig=config)  # fmt: skip
    source = ConfigMapAdapters(LoraConfigMapSettings(name="loras"), discovery, registry,
                               unload=unload)  # fmt: skip
    try:
        api.data = entries("name: same, base_model: m, source: /same",
                           "name: src, base_model: m, source: /old",
                           "name: base, base_model: m, source: /base",
                           "name: rank, base_model: m, source: /rank, rank: 8",
                           "name: gone, base_model: m, source: /gone",
                           "name: mine, base_model: m, source: /other")  # fmt: skip
        assert asyncio.run(source.refresh()) and calls == []  # all new (mine: the admin's)
        api.data = entries("name: same, base_model: m, source: /same",
                           "name: src, base_model: m, source: /new",
                           "name: base, base_model: m2, source: /base",
                           "name: rank, base_model: m, source: /rank, rank: 16",
                           "name: added, base_model: m, source: /added")  # fmt: skip
        assert asyncio.run(source.refresh())
        assert calls == [
            ("gone", None),  # unregistered before its unload
            ("src", AdapterSpec("src", "m", "/new", None, Origin.CONFIGMAP)),
            ("base", AdapterSpec("base", "m2", "/base", None, Origin.CONFIGMAP)),
        ]
        calls.clear()
        api.status = 500  # a failed read changes nothing, unloads nothing
        assert not asyncio.run(source.refresh()) and calls == []
        api.status, api.data = 200, None  # the ConfigMap deleted: every entry leaves
        assert asyncio.run(source.refresh())
        assert sorted(name for name, _ in calls) == ["added", "base", "rank", "same", "src"]
        assert all(spec is None for _, spec in calls) and registry.get("mine") is not None
    finally:
        source.close()


def test_configmap_reader_closed_during_a_read_leaves_the_client_to_it(
    kube: tuple[FakeKubeApi, Path],
) -> None:
    """A read cancelled at shutdown goes on in its worker thread. ``close()`` used to close
    the client under it (a read not yet in its connection pool then opens a new pool that
    nothing closes: a socket for the garbage collector) and later reads reopened it; now
    the read in flight closes the client when it ends, and no read starts once closed."""
    api, config = kube
    discovery = DiscoverySettings(kind="kubernetes", selector="app=e", namespace="ns",
                                  kubeconfig=config)  # fmt: skip
    source = ConfigMapAdapters(LoraConfigMapSettings(name="loras"), discovery,
                               AdapterRegistry())  # fmt: skip
    api.data = {"adapters.yaml": "- {name: a, base_model: m, source: /a}\n"}
    try:
        assert asyncio.run(source.refresh())
        pools = source._api.rest_client.pool_manager.pools  # the client's connection pools
        assert len(pools) == 1
        api.gate = threading.Event()  # the next answer waits for the test

        async def cancelled_read() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(source.refresh)
                for _ in range(1000):  # bounded: 10 s
                    if len(api.paths) == 2:
                        break
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()  # the read goes on in its thread

        asyncio.run(cancelled_read())
        assert len(api.paths) == 2
        source.close()
        assert len(pools) == 1  # still the read's
        api.gate.set()
        assert wait_until(lambda: len(pools) == 0, timeout=10)  # closed by the read's end
        assert not asyncio.run(source.refresh()) and len(api.paths) == 2  # closed: no read
    finally:
        if api.gate is not None:
            api.gate.set()
        source.close()


# -- demand, book, answers, errors, settings ----------------------------------------------


def test_demand_tracker_rate_ewma_and_pruning() -> None:
    known = AdapterRegistry(specs=[_spec("a"), _spec("b")])
    t = DemandTracker(alpha=0.5)
    t.tick(0.0, known)  # starts the window
    for _ in range(4):
        t.arrived("a", now=1.0)
    t.arrived("zz", now=1.5)  # not registered: dropped at the tick
    t.tick(2.0, known)
    assert t.rates == {"a": 2.0, "b": 0.0} and t.last_used == {"a": 1.0}
    t.tick(4.0, known)  # no requests: the rate halves (alpha 0.5)
    assert t.rates["a"] == 1.0
    known.remove("a")
    t.tick(5.0, known)
    assert "a" not in t.rates and "a" not in t.last_used
    t.tick(5.0, known)  # no time passed: nothing changes
    assert t.rates == {"b": 0.0}


def _engines() -> EndpointRegistry:
    reg = EndpointRegistry()
    for eid in ("e1", "e2"):
        state = reg.add(f"http://127.0.0.1:1/{eid}", endpoint_id=eid)
        state.set_models([ModelCard("base")])
        state.record_probe(True, fail_threshold=1, success_threshold=1)
    return reg


def test_book_reconciles_with_what_engines_list() -> None:
    now = [100.0]
    book = LoraBook(clock=lambda: now[0], default_max_loras=1)
    reg = _engines()
    e1 = reg.get("e1")
    assert e1 is not None
    e1.set_models([ModelCard("base"), ModelCard("hand", parent="base")])
    assert book.reconcile(reg) == (1, 0)  # loaded by hand: seen now
    book.mark_loaded("e1", "ours")
    now[0] = 150.0
    e1.set_models([ModelCard("base")])  # restarted: empty
    assert book.reconcile(reg) == (0, 2)
    e1.engine.observe_metrics(EngineMetrics(max_lora=4), at=1.0)
    e1.set_models([ModelCard("base"), ModelCard("x", parent="base")])
    book.mark_loaded("e1", "x")
    slots = {s.engine_id: s for s in book.slots(reg, last_used={"x": 140.0})}
    assert slots["e1"].max_loras == 4 and slots["e2"].max_loras == 1  # scraped, else configured
    e2 = reg.get("e2")
    assert e2 is not None and e2.snapshot().max_loras == 1  # published by reconcile
    assert slots["e1"].loaded == {"x": 150.0} and slots["e1"].last_used == {"x": 140.0}
    reg.remove("e2")
    book.reconcile(reg)
    assert [s.engine_id for s in book.slots(reg, last_used={})] == ["e1"]
    snap = e1.snapshot()  # what routing sees: scraped slots win over the default
    assert snap.max_loras == 4 and snap.adapters == frozenset({"x"}) and snap.free_lora_slots == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b'{"error": {"message": "boom", "type": "NotFoundError", "code": 404}}', "boom"),
     (b'{"object": "error", "message": "flat"}', "flat"),
     (b"Success: done.", "Success: done."),
     (b'["odd"]', '["odd"]'),
     (b"x" * 2000, "x" * 512)],
)  # fmt: skip
def test_engine_answer_messages(raw: bytes, message: str) -> None:
    assert _message(raw) == message


def test_adapter_rejected_keeps_the_engines_status() -> None:
    assert AdapterRejected("m", status=404).status == 404
    assert AdapterRejected("m", status=503).status == 400  # only 4xx pass through
    exc = AdapterLoadTimeout("slow", retry_after_s=2.5)
    assert exc.status == 503 and (b"retry-after-ms", b"2500") in error_headers(exc)


def test_only_worker_zero_runs_the_placement_controller() -> None:
    settings = Settings.model_validate({"lora": {"placement_interval_s": 1.5}})
    assert worker_settings(settings, 0) is settings
    other = worker_settings(settings, 3)
    assert other.lora.placement_interval_s == 0 and other.routing == settings.routing


def test_lora_settings_validation() -> None:
    adapter: dict[str, Any] = {"name": "a", "base_model": "m", "source": "/a"}
    with pytest.raises(ValidationError, match="duplicate"):
        LoraSettings.model_validate({"adapters": [adapter, adapter]})
    with pytest.raises(ValidationError, match="placement"):
        LoraSettings(placement={"no_such_knob": 1})
    s = Settings.model_validate(
        {"lora": {"adapters": [adapter], "placement": {"min_residency_s": 5}}}
    )
    assert PlacementSettings(**s.lora.placement).min_residency_s == 5
    with pytest.raises(ValidationError):
        LoraSettings.model_validate({"adapters": [{**adapter, "rank": 0}]})
    with pytest.raises(ValidationError, match="kubernetes"):
        Settings.model_validate({"lora": {"configmap": {"name": "x"}}})


def test_placement_overrides_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the environment every value is a string: "false" must turn the preload off (a
    non-empty string is true), "10" must be a number (compared with floats)."""
    monkeypatch.setenv("SWITCHYARD_LORA__PLACEMENT__PRELOAD", "false")
    monkeypatch.setenv("SWITCHYARD_LORA__PLACEMENT__MIN_RESIDENCY_S", "10")
    placement = Settings().lora.placement
    assert placement == {"preload": False, "min_residency_s": 10.0}
    assert PlacementSettings(**placement).preload is False
    for bad in ({"preload": "maybe"}, {"min_residency_s": -1}, {"max_actions": 0}):
        with pytest.raises(ValidationError, match="placement"):
            LoraSettings(placement=bad)


# -- an on-demand wait whose client leaves -------------------------------------------------


class HangingLoads:
    """An engine whose load calls never answer (until the test ends)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(30)


def _hanging_loader(
    url: str, inflight: InFlight | None = None
) -> tuple[OnDemandLoader, LoraActuator, LoraMetrics, Upstream, EndpointState]:
    reg = EndpointRegistry()
    state = reg.add(url, endpoint_id="e1")
    state.set_models([ModelCard("base")])
    state.record_probe(True, fail_threshold=1, success_threshold=1)
    settings = LoraSettings(max_loras=2, load_timeout_s=10.0, request_timeout_s=20.0)
    metrics = LoraMetrics.create(CollectorRegistry())
    adapters = AdapterRegistry(specs=[AdapterSpec("a", "base", "/m/a")])
    control = Upstream.for_control(Settings().proxy)
    actuator = LoraActuator(client=control, adapters=adapters,
                            book=LoraBook(), settings=settings, metrics=metrics)  # fmt: skip
    loader = OnDemandLoader(endpoints=reg, actuator=actuator, settings=settings,
                            placement=PlacementSettings(), metrics=metrics, last_used=dict,
                            inflight=inflight)  # fmt: skip
    return loader, actuator, metrics, control, state


SPEC_A = AdapterSpec("a", "base", "/m/a")


@pytest.mark.anyio
async def test_a_waiter_that_leaves_gets_an_answer_and_the_load_goes_on() -> None:
    with ServerThread(HangingLoads()) as srv:
        loader, actuator, metrics, control, state = _hanging_loader(srv.url)

        async def gone() -> None:
            await asyncio.sleep(0.05)

        try:
            with pytest.raises(AdapterLoadTimeout, match="client left"):
                await loader.ensure(SPEC_A, prompt_tokens=10, gone=gone)
            assert actuator.pending("a") is not None  # the load goes on for the next ones
            assert state.snapshot().loading_adapters == frozenset({"a"})
            assert loader.waiting == {} and loader.waiting_tokens == {}
            assert metrics.on_demand.labels(outcome="disconnect")._value.get() == 1
        finally:
            await actuator.aclose()
            await control.aclose()
        assert actuator.pending("a") is None
        assert state.snapshot().loading_adapters == frozenset()


@pytest.mark.anyio
async def test_waiters_get_503_shutting_down_at_shutdown() -> None:
    inflight = InFlight()
    with ServerThread(HangingLoads()) as srv:
        loader, actuator, metrics, control, _ = _hanging_loader(srv.url, inflight)
        try:
            waiters = [asyncio.create_task(loader.ensure(SPEC_A)) for _ in range(3)]
            for _ in range(1000):  # bounded: until the three wait
                if loader.waiting.get("a", 0) == 3:
                    break
                await asyncio.sleep(0.01)
            assert len(inflight) == 3 and inflight.cancel_all() == 3
            for waiter in waiters:
                with pytest.raises(ShuttingDown):
                    await waiter
            assert metrics.on_demand.labels(outcome="shutdown")._value.get() == 3
            assert len(inflight) == 0
        finally:
            await actuator.aclose()
            await control.aclose()


class ScriptedEngine:
    """Answers every load/unload with ``status`` and ``body`` (after ``delay_s``)."""

    def __init__(self, status: int, body: bytes, delay_s: float = 0.0) -> None:
        self.status, self.body, self.delay_s = status, body, delay_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(self.delay_s)
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": self.body})


@pytest.mark.parametrize(
    ("status", "body", "delay_s", "error", "code", "outcome"),
    [(500, b'{"error": {"message": "engine broke"}}', 0.0, "AdapterLoadFailed", 502, "failed"),
     (422, b'{"detail": "bad"}', 0.0, "AdapterRejected", 422, "rejected"),
     (200, b"ok", 2.0, "UpstreamTimeout", 504, "timeout")],
)  # fmt: skip
@pytest.mark.anyio
async def test_actuator_maps_engine_answers(
    status: int, body: bytes, delay_s: float, error: str, code: int, outcome: str
) -> None:
    with ServerThread(ScriptedEngine(status, body, delay_s)) as srv:
        reg = EndpointRegistry()
        state = reg.add(srv.url, endpoint_id="e1")
        state.set_models([ModelCard("base"), ModelCard("old", parent="base")])
        metrics = LoraMetrics.create(CollectorRegistry())
        control = Upstream.for_control(Settings().proxy)
        actuator = LoraActuator(
            client=control, adapters=AdapterRegistry(specs=[SPEC_A]),
            book=LoraBook(), settings=LoraSettings(request_timeout_s=0.5), metrics=metrics,
        )  # fmt: skip
        try:
            for op in ("load", "unload"):
                with pytest.raises(GatewayError) as caught:
                    if op == "load":
                        await actuator.load(state, SPEC_A, reason="demand")
                    else:
                        await actuator.unload(state, "old", reason="idle")
                assert type(caught.value).__name__ == error and caught.value.status == code
                reason = "demand" if op == "load" else "idle"
                counted = metrics.operations.labels(op=op, reason=reason, outcome=outcome)
                assert counted._value.get() == 1
            assert [c.id for c in state.models] == ["base", "old"]  # nothing changed
        finally:
            await control.aclose()


@pytest.mark.anyio
async def test_actuator_unreachable_engine_and_unresolvable_source() -> None:
    class Refuses:
        def check(self, source: str) -> None:
            pass

        async def lora_path(self, spec: AdapterSpec) -> str:
            raise ValueError("the bucket is gone")

    reg = EndpointRegistry()
    state = reg.add("http://127.0.0.1:9", endpoint_id="e1")  # discard port: refused
    metrics = LoraMetrics.create(CollectorRegistry())
    control = Upstream.for_control(Settings().proxy)
    adapters = AdapterRegistry(specs=[SPEC_A])
    actuator = LoraActuator(client=control, adapters=adapters, book=LoraBook(),
                            settings=LoraSettings(), metrics=metrics)  # fmt: skip
    try:
        with pytest.raises(AdapterLoadFailed, match="unreachable"):
            await actuator.load(state, SPEC_A, reason="on_demand")
        adapters.resolver = Refuses()
        with pytest.raises(AdapterLoadFailed, match="bucket is gone"):
            await actuator.load(state, SPEC_A, reason="on_demand")
        failed = metrics.operations.labels(op="load", reason="on_demand", outcome="failed")
        assert failed._value.get() == 2
    finally:
        await control.aclose()


# -- refused loads back off -----------------------------------------------------------------


def test_load_backoff_schedule_reset_and_pruning() -> None:
    now = [100.0]
    schedule = PlacementSettings(load_backoff_s=5.0, load_backoff_max_s=20.0)
    backoff = LoadBackoff(clock=lambda: now[0], settings=schedule)
    refused = AdapterRejected("engine e1 could not load adapter a: No adapter found", status=404)
    waits = []
    for _ in range(4):  # 5, 10, 20, 20 (capped)
        waits.append(backoff.failed(SPEC_A, "e1", refused).retry_at - now[0])
    assert waits == [5.0, 10.0, 20.0, 20.0]
    assert backoff.blocked() == {"e1": frozenset({"a"})}
    now[0] += 19.0
    assert backoff.blocked() == {"e1": frozenset({"a"})}
    now[0] += 1.0  # the backoff passed: loads may be tried again (the count stays)
    assert backoff.blocked() == {} and backoff.failures("a")["e1"].failures == 4
    assert backoff.failed(SPEC_A, "e1", refused).retry_at == now[0] + 20.0
    backoff.succeeded("a", "e1")  # a success forgets it
    assert backoff.failures("a") == {} and backoff.blocked() == {}
    assert backoff.failed(SPEC_A, "e1", refused).retry_at == now[0] + 5.0
    moved = AdapterSpec("a", "base", "/m/fixed")
    backoff.check(moved)  # re-registered with another source: afresh
    assert backoff.failures("a") == {}
    backoff.failed(SPEC_A, "e1", refused)
    backoff.failed(SPEC_A, "e2", AdapterLoadFailed("engine e2 unreachable"))
    registry = AdapterRegistry(specs=[SPEC_A])
    backoff.sync(registry, {"e1"})  # engine e2 gone
    assert set(backoff.failures("a")) == {"e1"}
    backoff.sync(AdapterRegistry(specs=[moved]), {"e1"})  # changed in the registry
    assert backoff.failures("a") == {}
    backoff.failed(SPEC_A, "e1", refused)
    backoff.sync(AdapterRegistry(), {"e1"})  # unregistered
    assert backoff.failures("a") == {}
    backoff.failed(SPEC_A, "e1", refused)
    backoff.forget("a")
    assert backoff.failures("a") == {}


def test_load_backoff_answers_with_the_remembered_error() -> None:
    now = [0.0]
    backoff = LoadBackoff(clock=lambda: now[0], settings=PlacementSettings())
    backoff.failed(SPEC_A, "e2", AdapterLoadFailed("engine e2 unreachable"))
    backoff.failed(SPEC_A, "e1", AdapterRejected("No adapter found for /m/a", status=404))
    error = backoff.refusal("a", ["e1", "e2"])  # the 4xx wins: the adapter is at fault
    assert isinstance(error, AdapterRejected) and error.status == 404
    assert "No adapter found for /m/a" in error.message and "not retried for 5s" in error.message
    assert error is not backoff.refusal("a", ["e1", "e2"])  # one per request
    assert isinstance(backoff.refusal("a", ["e2"]), AdapterLoadFailed)
    backoff.failed(SPEC_A, "e3", UpstreamTimeout("slow"))
    assert isinstance(backoff.refusal("a", ["e3"]), UpstreamTimeout)
    assert isinstance(backoff.refusal("zz", ["e1"]), AdapterLoadFailed)
    view = backoff.describe("a", wall=lambda: 1_000.0)
    assert view["last_status"] in (404, 502, 504) and view["retry_at"] == 1_005.0
    assert view["failed_on"]["e1"] == {"failures": 1, "status": 404, "retry_in_s": 5.0}
    now[0] = 10.0
    assert backoff.describe("a")["retry_at"] is None  # may be tried now
    assert backoff.describe("zz") == {"last_error": None, "last_status": None,
                                      "retry_at": None, "failed_on": {}}  # fmt: skip


class CountingEngine:
    """Answers loads with ``status`` (the engine's 404 for a missing source by default) and
    unloads with 200; counts the calls per path."""

    def __init__(self, status: int = 404) -> None:
        self.status = status
        self.calls: dict[str, int] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.calls[path] = self.calls.get(path, 0) + 1
        status = self.status if path.endswith("/load_lora_adapter") else 200
        body = b'{"error": {"message": "No adapter found for /m/a"}}' if status >= 400 else b"ok"
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


def _backoff_parts(
    url: str, now: list[float], *, max_loras: int, loaded: tuple[str, ...] = ()
) -> tuple[OnDemandLoader, LoraActuator, LoraMetrics, Upstream, EndpointRegistry]:
    reg = EndpointRegistry()
    state = reg.add(url, endpoint_id="e1")
    state.set_models([ModelCard("base"), *(ModelCard(a, parent="base") for a in loaded)])
    state.record_probe(True, fail_threshold=1, success_threshold=1)
    placement = PlacementSettings(min_residency_s=0.0, min_idle_s=0.0, load_backoff_s=5.0)
    settings = LoraSettings(max_loras=max_loras, load_timeout_s=5.0, request_timeout_s=5.0)
    metrics = LoraMetrics.create(CollectorRegistry())
    book = LoraBook(clock=lambda: now[0], default_max_loras=max_loras)
    control = Upstream.for_control(Settings().proxy)
    actuator = LoraActuator(client=control, adapters=AdapterRegistry(specs=[SPEC_A]), book=book,
                            settings=settings, metrics=metrics,
                            backoff=LoadBackoff(clock=book.clock, settings=placement))  # fmt: skip
    loader = OnDemandLoader(endpoints=reg, actuator=actuator, settings=settings,
                            placement=placement, metrics=metrics, last_used=dict)  # fmt: skip
    return loader, actuator, metrics, control, reg


LOAD_PATH = "/v1/load_lora_adapter"


class RecordingEngine:
    """Answers loads and unloads 200; records each call's ``lora_name`` per path; its
    unloads take ``unload_s`` (the second decision happens while the first one runs)."""

    def __init__(self, unload_s: float) -> None:
        self.unload_s = unload_s
        self.names: dict[str, list[str]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.names.setdefault(scope["path"], []).append(json.loads(body)["lora_name"])
        if scope["path"].endswith("/unload_lora_adapter"):
            await anyio.sleep(self.unload_s)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.anyio
async def test_concurrent_on_demand_loads_make_room_with_different_victims() -> None:
    """A full engine and two first requests for different adapters at once: the second
    decision, made while the first victim's unload runs, picks another victim (it used to
    pick the same one: both loads landed, one slot over the engine's capacity)."""
    engine = RecordingEngine(unload_s=0.3)
    now = [100.0]
    with ServerThread(engine) as srv:
        reg = EndpointRegistry()
        state = reg.add(srv.url, endpoint_id="e1")
        state.set_models([ModelCard("base"), ModelCard("p0", parent="base"),
                          ModelCard("p1", parent="base")])  # fmt: skip
        state.record_probe(True, fail_threshold=1, success_threshold=1)
        specs = [_spec("x"), _spec("y")]
        placement = PlacementSettings(min_residency_s=0.0, min_idle_s=0.0)
        settings = LoraSettings(max_loras=2, load_timeout_s=5.0, request_timeout_s=5.0)
        metrics = LoraMetrics.create(CollectorRegistry())
        book = LoraBook(clock=lambda: now[0], default_max_loras=2)
        book.reconcile(reg)
        control = Upstream.for_control(Settings().proxy)
        actuator = LoraActuator(client=control, adapters=AdapterRegistry(specs=specs),
                                book=book, settings=settings, metrics=metrics)  # fmt: skip
        loader = OnDemandLoader(endpoints=reg, actuator=actuator, settings=settings,
                                placement=placement, metrics=metrics, last_used=dict)  # fmt: skip
        try:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for spec in specs:
                        tg.start_soon(loader.ensure, spec)
            assert sorted(engine.names["/v1/unload_lora_adapter"]) == ["p0", "p1"]
            assert sorted(engine.names["/v1/load_lora_adapter"]) == ["x", "y"]
            held = {c.id for c in state.models if c.parent}
            assert held == {"x", "y"}
        finally:
            await actuator.aclose()
            await control.aclose()


@pytest.mark.anyio
async def test_a_refused_load_is_remembered_and_tried_again_after_the_backoff() -> None:
    engine = CountingEngine(404)
    now = [100.0]
    with ServerThread(engine) as srv:
        loader, actuator, metrics, control, _ = _backoff_parts(srv.url, now, max_loras=2)
        try:
            with pytest.raises(AdapterRejected, match="No adapter found"):
                await loader.ensure(SPEC_A)
            for _ in range(5):  # answered from the remembered refusal: no new load
                with pytest.raises(AdapterRejected, match="not retried for 5s") as caught:
                    await loader.ensure(SPEC_A)
                assert caught.value.status == 404
            assert engine.calls[LOAD_PATH] == 1
            assert metrics.suppressed.labels(reason="on_demand")._value.get() == 5
            assert metrics.on_demand.labels(outcome="rejected")._value.get() == 6
            now[0] += 5.0  # the backoff passed: one more try (refused again: 10 s now)
            with pytest.raises(AdapterRejected):
                await loader.ensure(SPEC_A)
            assert engine.calls[LOAD_PATH] == 2
            assert actuator.backoff.failures("a")["e1"].retry_at == now[0] + 10.0
            engine.status = 200  # the source fixed: the try after the backoff loads it
            now[0] += 10.0
            await loader.ensure(SPEC_A)
            assert engine.calls[LOAD_PATH] == 3 and actuator.backoff.failures("a") == {}
        finally:
            await actuator.aclose()
            await control.aclose()


@pytest.mark.anyio
async def test_no_room_is_made_for_an_adapter_backing_off() -> None:
    """A full engine (one slot, an adapter loaded by hand): the first refused load may have
    cost the hand-loaded one its slot, but no round or request after it unloads anything."""
    engine = CountingEngine(404)
    now = [100.0]
    with ServerThread(engine) as srv:
        loader, actuator, metrics, control, reg = _backoff_parts(
            srv.url, now, max_loras=1, loaded=("hand",)
        )
        adapters = AdapterRegistry(specs=[SPEC_A])
        demand = DemandTracker(alpha=0.5)
        controller = PlacementController(
            endpoints=reg, adapters=adapters, actuator=actuator, loader=loader, demand=demand,
            settings=LoraSettings(max_loras=1, placement_interval_s=0.2),
            placement=PlacementSettings(min_residency_s=0.0, min_idle_s=0.0), metrics=metrics,
        )  # fmt: skip
        try:
            actuator.backoff.failed(SPEC_A, "e1", AdapterRejected("No adapter found", status=404))
            for _ in range(20):  # 20 rounds with demand: nothing planned, nothing unloaded
                demand.arrived("a", now=now[0])
                assert await controller.step() == ()
                now[0] += 0.2
            with pytest.raises(AdapterRejected):
                await loader.ensure(SPEC_A)
            assert engine.calls == {} and [c.id for c in reg.get("e1").models] == ["base", "hand"]  # type: ignore[union-attr]
            assert metrics.suppressed.labels(reason="demand")._value.get() == 20
            assert metrics.suppressed.labels(reason="on_demand")._value.get() == 1
            now[0] += 5.0  # the backoff passed: the load is planned again, with its room
            demand.arrived("a", now=now[0])
            planned = await controller.step()
            assert [(a.kind, a.adapter, a.reason) for a in planned] == [
                ("unload", "hand", "make_room"), ("load", "a", "demand")]  # fmt: skip
            assert engine.calls[LOAD_PATH] == 1
        finally:
            await actuator.aclose()
            await control.aclose()


def test_demand_of_adapters_gone_is_pruned_with_the_controller_off() -> None:
    """With ``placement_interval_s: 0`` the tracker never ticks; its per-adapter entries
    used to grow with every adapter name ever requested (admin register/delete cycles).
    Each reconcile now drops those of adapters neither registered nor listed by an engine."""
    reg = _engines()
    e1 = reg.get("e1")
    assert e1 is not None
    e1.set_models([ModelCard("base"), ModelCard("hand", parent="base")])
    adapters = AdapterRegistry(specs=[_spec("a")])
    settings = LoraSettings(max_loras=1, placement_interval_s=0)
    metrics = LoraMetrics.create(CollectorRegistry())
    actuator = LoraActuator(client=Upstream.for_control(Settings().proxy), adapters=adapters,
                            book=LoraBook(), settings=settings, metrics=metrics)  # fmt: skip
    demand = DemandTracker(alpha=0.5)
    loader = OnDemandLoader(endpoints=reg, actuator=actuator, settings=settings,
                            placement=PlacementSettings(), metrics=metrics,
                            last_used=lambda: demand.last_used)  # fmt: skip
    controller = PlacementController(
        endpoints=reg, adapters=adapters, actuator=actuator, loader=loader, demand=demand,
        settings=settings, placement=PlacementSettings(), metrics=metrics,
    )  # fmt: skip
    for i in range(100):  # registered, requested, deleted
        adapters.add(_spec(f"tmp{i}"))
        demand.arrived(f"tmp{i}", now=float(i))
        adapters.remove(f"tmp{i}")
    demand.arrived("a", now=200.0)
    demand.arrived("hand", now=201.0)  # loaded by hand, listed by e1: its last use is kept
    controller.reconcile()
    assert demand.last_used == {"a": 200.0, "hand": 201.0}
    demand.tick(300.0, adapters)  # the window starts; the counts held only known names
    demand.tick(301.0, adapters)
    assert set(demand.rates) == {"a"}
