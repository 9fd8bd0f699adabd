"""Table tests for LoRA placement (routing/lora.py) with an injected clock (``now``)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from routing.lora import (
    AdapterDemand,
    EngineSlots,
    PlacementAction,
    PlacementSettings,
    blocked_everywhere,
    choose_for_load,
    desired_replicas,
    load_backoff,
    plan,
    suppressed,
)

NOW = 1000.0
S = PlacementSettings(
    rate_per_replica=2.0,
    tokens_per_replica=1000,
    hysteresis=1,
    min_residency_s=30.0,
    min_idle_s=5.0,
    idle_s=300.0,
    max_actions=8,
    preload=False,  # the preload tables say preload=True
)


def eng(eid: str, *loaded: str, base: str = "llama", slots: int = 2, **kw: Any) -> EngineSlots:
    """An engine whose ``loaded`` adapters were loaded long ago (past min residency)."""
    at = kw.pop("loaded_at", {})
    return EngineSlots(eid, base, max_loras=slots, loaded={a: at.get(a, 0.0) for a in loaded}, **kw)


def dem(name: str, rate: float = 1.0, **kw: Any) -> AdapterDemand:
    kw.setdefault("last_used", NOW - 1.0)
    return AdapterDemand(name, kw.pop("base", "llama"), rate, **kw)


def load(adapter: str, eid: str, reason: str = "demand") -> PlacementAction:
    return PlacementAction("load", adapter, eid, reason)


def unload(adapter: str, eid: str, reason: str) -> PlacementAction:
    return PlacementAction("unload", adapter, eid, reason)


def run(demand: list[AdapterDemand], engines: list[EngineSlots], **kw: Any) -> list[Any]:
    settings = PlacementSettings(**{**_fields(S), **kw}) if kw else S
    return list(plan(demand, engines, now=NOW, settings=settings))


def _fields(s: PlacementSettings) -> dict[str, Any]:
    return {name: getattr(s, name) for name in s.__slots__}


# -- desired_replicas ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("demand", "now", "want"),
    [
        (AdapterDemand("a", "m", 0.0), NOW, 0),  # never used
        (AdapterDemand("a", "m", 5.0), NOW, 0),  # a rate without a request: never used
        (AdapterDemand("a", "m", 0.0, waiting=1), NOW, 1),  # a request waits for a load
        (AdapterDemand("a", "m", 0.0, queued_tokens=2500), NOW, 3),  # ceil(2500 / 1000)
        (AdapterDemand("a", "m", 0.1, last_used=NOW - 10), NOW, 1),  # recent: at least 1
        (AdapterDemand("a", "m", 4.0, last_used=NOW), NOW, 2),
        (AdapterDemand("a", "m", 4.5, last_used=NOW), NOW, 3),
        (AdapterDemand("a", "m", -1.0, last_used=NOW), NOW, 1),  # a bad EWMA is no demand
        (AdapterDemand("a", "m", 4.0, last_used=NOW - 300), NOW, 0),  # idle past idle_s
        (AdapterDemand("a", "m", 4.0, last_used=NOW - 299), NOW, 2),
        (AdapterDemand("a", "m", 4.0, last_used=0.0), None, 2),  # no clock: caller judges
        (AdapterDemand("a", "m", 0.0, last_used=NOW - 400, waiting=2), NOW, 1),
    ],
)
def test_desired_replicas(demand: AdapterDemand, now: float | None, want: int) -> None:
    assert desired_replicas(demand, S, now=now) == want


def test_desired_replicas_capped_by_max_replicas() -> None:
    hot = AdapterDemand("a", "m", 50.0, last_used=NOW)
    assert desired_replicas(hot, S) == 25
    assert desired_replicas(hot, PlacementSettings(max_replicas=3)) == 3


@pytest.mark.parametrize(
    "kw",
    [
        {"rate_per_replica": 0.0},
        {"tokens_per_replica": 0},
        {"max_replicas": 0},
        {"hysteresis": -1},
        {"max_actions": 0},
        {"min_residency_s": -1.0},
        {"min_idle_s": -1.0},
        {"idle_s": -1.0},
        {"displace_ratio": 0.5},
    ],
)
def test_settings_reject_nonsense(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PlacementSettings(**kw)


def test_engine_slots_counts_loading_once() -> None:
    e = eng("e0", "a", "b", slots=4, loading=frozenset({"b", "c"}))
    assert (e.used, e.free) == (3, 1)
    assert e.holds("a") and e.holds("c") and not e.holds("d")
    assert eng("e1", "a", "b", "c", slots=2).free == 0  # hand-loaded beyond its slots


# -- plan: packing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("demand", "engines", "want"),
    [
        # Nothing demanded, nothing held: nothing to do.
        ([], [eng("e0"), eng("e1")], []),
        # Higher rate first; each onto the engine with fewer adapters, then lower load, id.
        (
            [dem("a", 0.5), dem("b", 1.5), dem("c", 1.0)],
            [eng("e0"), eng("e1")],
            [load("b", "e0"), load("c", "e1"), load("a", "e0")],
        ),
        # Fewer adapters beats lower load; then lower load beats the id.
        (
            [dem("a")],
            [eng("e0", "x", load=0.0), eng("e1", load=9.0), eng("e2", load=3.0)],
            [load("a", "e2")],
        ),
        # Full engines, nothing reclaimable (x, y in demand, recent): the rest waits.
        (
            [dem("x"), dem("y"), dem("z")],
            [eng("e0", "x", slots=1), eng("e1", "y", slots=1)],
            [],
        ),
        # Only engines of the adapter's base model.
        (
            [dem("a", base="mistral")],
            [eng("e0"), eng("e1", base="mistral", slots=1)],
            [load("a", "e1")],
        ),
        ([dem("a", base="qwen")], [eng("e0")], []),
        # Held (loaded or loading) counts: no second load while one is under way.
        ([dem("a")], [eng("e0", loading=frozenset({"a"})), eng("e1")], []),
        ([dem("a")], [eng("e0", "a"), eng("e1")], []),
        # Unhealthy engines get nothing and their replicas count for nothing.
        ([dem("a")], [eng("e0", "a", healthy=False), eng("e1")], [load("a", "e1")]),
        # An engine without LoRA slots is never used.
        ([dem("a")], [eng("e0", slots=0), eng("e1")], [load("a", "e1")]),
        # A request waiting for a load beats a higher rate for the last slot.
        (
            [dem("busy", 1.9), dem("wait", 0.1, waiting=1)],
            [eng("e0", slots=1)],
            [load("wait", "e0")],
        ),
    ],
)
def test_plan_packing(
    demand: list[AdapterDemand], engines: list[EngineSlots], want: list[PlacementAction]
) -> None:
    assert run(demand, engines) == want


# -- plan: hot adapters spread ------------------------------------------------------------
def test_hot_adapter_spreads_over_engines_up_to_its_desired_replicas() -> None:
    engines = [eng("e0", load=1.0), eng("e1"), eng("e2", load=2.0), eng("e3", load=3.0)]
    actions = run([dem("hot", 5.0)], engines)  # ceil(5 / 2) = 3 replicas
    assert actions == [load("hot", "e1"), load("hot", "e0", "spread"), load("hot", "e2", "spread")]


def test_spreading_is_capped_by_engines_and_max_replicas() -> None:
    engines = [eng("e0"), eng("e1")]
    assert len(run([dem("hot", 100.0)], engines)) == 2
    assert run([dem("hot", 100.0)], engines, max_replicas=1) == [load("hot", "e0")]


def test_placements_go_by_marginal_value_a_hot_spread_before_a_cold_first_replica() -> None:
    # hot 9 req/s: its 2nd replica serves 4.5 req/s, more than cold's 1st (0.1 req/s).
    engines = [eng("e0", slots=1), eng("e1", slots=1)]
    actions = run([dem("hot", 9.0), dem("cold", 0.1)], engines)
    assert actions == [load("hot", "e0"), load("hot", "e1", "spread")]


def test_a_waiting_request_still_gets_its_first_replica_before_any_spread() -> None:
    engines = [eng("e0", slots=1), eng("e1", slots=1)]
    actions = run([dem("hot", 9.0), dem("cold", 0.1, waiting=1)], engines)
    assert actions == [load("cold", "e0"), load("hot", "e1")]


@pytest.mark.parametrize(
    ("cold_rate", "want"),
    [
        # cold serves 0.1 req/s per replica, hot's 2nd replica 2.2: cold makes room.
        (0.1, [unload("cold", "e1", "make_room"), load("hot", "e1", "spread")]),
        # 1.2 x displace_ratio 2 = 2.4 > 2.2: cold stays, hot does not spread.
        (1.2, []),
    ],
)
def test_a_hot_adapter_spreads_when_slots_are_scarce_by_displacing_a_cold_one(
    cold_rate: float, want: list[PlacementAction]
) -> None:
    engines = [eng("e0", "hot", slots=1), eng("e1", "cold", slots=1)]
    demand = [dem("hot", 4.4), dem("cold", cold_rate, last_used=NOW - 10.0)]
    assert run(demand, engines) == want


def test_displacing_spares_waiting_active_and_recent_adapters() -> None:
    demand = [dem("hot", 4.4), dem("cold", 0.1, last_used=NOW - 10.0)]
    base = [eng("e0", "hot", slots=1)]
    assert run(demand, [*base, eng("e1", "cold", slots=1)]) != []  # the control case
    cases = [
        eng("e1", "cold", slots=1, active=frozenset({"cold"})),
        eng("e1", "cold", slots=1, loaded_at={"cold": NOW - 1.0}),  # within min residency
        eng("e1", "cold", slots=1, last_used={"cold": NOW - 1.0}),  # used within min_idle_s
    ]
    for e1 in cases:
        assert run(demand, [*base, e1]) == []
    waiting = [dem("hot", 4.4), dem("cold", 0.1, waiting=1, last_used=NOW - 10.0)]
    assert run(waiting, [*base, eng("e1", "cold", slots=1)]) == []
    assert run(demand, [*base, eng("e1", "cold", slots=1)], displace_ratio=float("inf")) == []


def test_surplus_and_idle_victims_go_before_displaced_ones() -> None:
    engines = [eng("e0", "hot", slots=1), eng("e1", "cold", "idle", slots=2)]
    demand = [dem("hot", 4.4), dem("cold", 0.1, last_used=NOW - 10.0),
              dem("idle", 0.0, last_used=NOW - 900)]  # fmt: skip
    assert run(demand, engines, max_actions=2) == [
        unload("idle", "e1", "make_room"),
        load("hot", "e1", "spread"),
    ]


def test_cpu_cache_is_the_residency_capacity() -> None:
    # 1 GPU slot, 3 adapters in the CPU cache: three adapters resident, no room made.
    e = EngineSlots("e0", "llama", max_loras=1, loaded={"a": 0.0}, max_cpu_loras=3)
    assert (e.capacity, e.free) == (3, 2)
    demand = [dem("a"), dem("b"), dem("c")]
    assert run(demand, [e]) == [load("b", "e0"), load("c", "e0")]
    # unknown CPU cache (None) or one below the GPU slots: max_loras is the capacity
    assert EngineSlots("e", "llama", max_loras=4, loaded={}).capacity == 4
    assert EngineSlots("e", "llama", max_loras=4, loaded={}, max_cpu_loras=2).capacity == 4


def test_on_demand_prefers_an_engine_with_a_free_gpu_slot() -> None:
    busy = EngineSlots("e0", "llama", max_loras=1, loaded={"a": 0.0}, max_cpu_loras=4,
                       active=frozenset({"a"}))  # fmt: skip
    idle = EngineSlots("e1", "llama", max_loras=1, loaded={"b": 0.0}, max_cpu_loras=4, load=3.0)
    assert (busy.gpu_free, idle.gpu_free) == (False, True)
    assert choose_for_load("new", "llama", [busy, idle], now=NOW, settings=S) == (
        load("new", "e1", "on_demand"),
    )


def test_spread_counts_existing_replicas() -> None:
    engines = [eng("e0", "hot"), eng("e1", "hot"), eng("e2")]
    assert run([dem("hot", 5.0)], engines) == [load("hot", "e2", "spread")]
    assert run([dem("hot", 3.0)], engines) == []


# -- plan: idle unloads, hand-loaded adapters, LRU ---------------------------------------
def test_idle_adapters_unload_lru_first_past_min_residency() -> None:
    engines = [
        eng("e0", "old", "older", last_used={"old": NOW - 400, "older": NOW - 900}),
        eng("e1", "old", "fresh", loaded_at={"fresh": NOW - 10}),
    ]
    demand = [dem("old", 0.0, last_used=NOW - 500), dem("fresh", 0.0, last_used=NOW - 600),
              dem("older", 0.0, last_used=NOW - 900)]  # fmt: skip
    assert run(demand, engines) == [
        # e0's own last use of "older" (900 s) and "old" (400 s); e1 falls back to the
        # adapter's last use (500 s); "fresh" was loaded 10 s ago: minimum residency.
        unload("older", "e0", "idle"),
        unload("old", "e1", "idle"),
        unload("old", "e0", "idle"),
    ]


@pytest.mark.parametrize(
    "engine",
    [
        eng("e0", "a", active=frozenset({"a"})),  # requests running there
        eng("e0", "a", loading=frozenset({"a"})),  # a reload under way
        eng("e0", "a", loaded_at={"a": NOW - 29}),  # minimum residency
    ],
)
def test_idle_adapter_kept_while_active_loading_or_young(engine: EngineSlots) -> None:
    assert run([dem("a", 0.0, last_used=NOW - 1000)], [engine]) == []


def test_hand_loaded_adapters_left_alone_while_slots_are_free() -> None:
    engines = [eng("e0", "manual"), eng("e1")]
    assert run([dem("a")], engines) == [load("a", "e1")]
    assert run([], engines) == []


def test_hand_loaded_adapter_unloaded_when_its_slot_is_needed() -> None:
    engines = [eng("e0", "manual", "b", slots=2, last_used={"b": NOW - 100})]
    assert run([dem("a"), dem("b", last_used=NOW - 2)], engines) == [
        unload("manual", "e0", "make_room"),  # no last use: its load time (0) is oldest
        load("a", "e0"),
    ]


def test_make_room_takes_the_least_recently_used_over_every_engine() -> None:
    engines = [
        eng("e0", "x", "y", last_used={"x": NOW - 50, "y": NOW - 60}),
        eng("e1", "z", "w", last_used={"z": NOW - 70, "w": NOW - 40}),
    ]
    demand = [dem("new")]  # x, y, z, w are hand-loaded here
    assert run(demand, engines) == [unload("z", "e1", "make_room"), load("new", "e1")]


def test_make_room_takes_an_idle_adapter_before_idle_unloads_run() -> None:
    engines = [eng("e0", "gone", slots=1)]
    demand = [dem("gone", 0.0, last_used=NOW - 400), dem("new")]
    assert run(demand, engines) == [unload("gone", "e0", "make_room"), load("new", "e0")]


@pytest.mark.parametrize(
    ("engine", "why"),
    [
        (eng("e0", "v", slots=1, loaded_at={"v": NOW - 29.9}), "min residency"),
        (eng("e0", "v", slots=1, last_used={"v": NOW - 4.9}), "used within min_idle_s"),
        (eng("e0", "v", slots=1, active=frozenset({"v"})), "requests running"),
        (eng("e0", slots=1, loading=frozenset({"v"})), "being loaded"),
    ],
)
def test_make_room_never_takes_a_protected_adapter(engine: EngineSlots, why: str) -> None:
    assert run([dem("new")], [engine]) == [], why


def test_min_residency_holds_against_idleness_and_need() -> None:
    young = eng("e0", "v", slots=1, loaded_at={"v": NOW - 1})
    idle = dem("v", 0.0, last_used=NOW - 10_000)
    assert run([idle, dem("new", waiting=3)], [young]) == []
    assert run([idle, dem("new", waiting=3)], [young], min_residency_s=0.0) == [
        unload("v", "e0", "make_room"),
        load("new", "e0"),
    ]


# -- plan: hysteresis -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("replicas", "hysteresis", "reclaimed"),
    [
        (2, 1, False),  # desired 1, 2 held: within desired + hysteresis
        (3, 1, True),  # 3 > 1 + 1: one surplus replica may go
        (2, 0, True),
        (3, 2, False),
    ],
)
def test_hysteresis_band_protects_replicas(replicas: int, hysteresis: int, reclaimed: bool) -> None:
    engines = [
        eng(f"e{i}", "warm", slots=1, last_used={"warm": NOW - 10 * (i + 1)})
        for i in range(replicas)
    ]
    demand = [dem("warm", 1.0), dem("new")]  # warm wants 1 replica
    # (displacing off: 1 req/s over 3 replicas would else make room for new's 1 req/s)
    actions = run(demand, engines, hysteresis=hysteresis, displace_ratio=float("inf"))
    last = f"e{replicas - 1}"  # the least recently used replica
    want = [unload("warm", last, "make_room"), load("new", last)] if reclaimed else []
    assert actions == want


def test_no_scale_down_without_need() -> None:
    engines = [eng(f"e{i}", "hot") for i in range(4)]  # hot was hot; now wants 1
    assert run([dem("hot", 0.5)], engines, hysteresis=0) == []


def test_plan_is_stable_once_applied() -> None:
    """Applying a plan and planning again yields nothing: no flapping at steady demand."""
    demand = [dem(n, r) for n, r in (("a", 5.0), ("b", 1.0), ("c", 0.2), ("d", 3.0))]
    engines = [eng(f"e{i}", slots=3) for i in range(3)]
    first = run(demand, engines)
    held: dict[str, dict[str, float]] = {e.engine_id: {} for e in engines}
    for action in first:
        assert action.kind == "load"
        held[action.engine_id][action.adapter] = NOW
    again = [EngineSlots(eid, "llama", 3, loaded) for eid, loaded in held.items()]
    assert sum(len(v) for v in held.values()) == 3 + 1 + 1 + 2
    assert run(demand, again) == []


# -- plan: bounded -----------------------------------------------------------------------------
def test_actions_are_bounded() -> None:
    demand = [dem(f"a{i}", 1.0 + i / 10) for i in range(6)]
    assert run(demand, [eng("e0", slots=8)], max_actions=2) == [
        load("a5", "e0"),
        load("a4", "e0"),
    ]


def test_make_room_pair_is_never_split_by_the_bound() -> None:
    engines = [eng("e0", "manual", slots=2)]
    demand = [dem("a", 2.0), dem("b", 1.0)]
    assert run(demand, engines, max_actions=2) == [load("a", "e0")]
    assert run(demand, engines, max_actions=3) == [
        load("a", "e0"),
        unload("manual", "e0", "make_room"),
        load("b", "e0"),
    ]


def test_spread_stops_at_the_bound() -> None:
    engines = [eng(f"e{i}") for i in range(4)]
    assert len(run([dem("hot", 8.0)], engines, max_actions=2)) == 2


def test_idle_unloads_come_after_loads_and_are_bounded() -> None:
    engines = [eng("e0", "i1", "i2", "i3", slots=5)]
    demand = [dem(n, 0.0, last_used=NOW - 1000 + k) for k, n in enumerate(("i1", "i2", "i3"))]
    actions = run([*demand, dem("new")], engines, max_actions=2)
    assert actions == [load("new", "e0"), unload("i1", "e0", "idle")]


# -- choose_for_load --------------------------------------------------------------------------
def choose(engines: list[EngineSlots], adapter: str = "a", **kw: Any) -> Any:
    settings = PlacementSettings(**{**_fields(S), **kw}) if kw else S
    return choose_for_load(adapter, "llama", engines, now=NOW, settings=settings)


@pytest.mark.parametrize(
    ("engines", "want"),
    [
        # Already held by a healthy engine of the base model: wait for it (coalesce).
        ([eng("e0", "a"), eng("e1")], ()),
        ([eng("e0", loading=frozenset({"a"})), eng("e1")], ()),
        # Held only by an unhealthy engine: load elsewhere.
        ([eng("e0", "a", healthy=False), eng("e1")], (load("a", "e1", "on_demand"),)),
        # A free slot: the least loaded engine, then the one with fewer adapters, then id.
        (
            [eng("e0", load=3.0), eng("e1", "x", load=1.0), eng("e2", load=1.0)],
            (load("a", "e2", "on_demand"),),
        ),
        ([eng("e0", "x", slots=1), eng("e1", slots=1)], (load("a", "e1", "on_demand"),)),
        # Full: make room with the least recently used reclaimable adapter.
        (
            [
                eng("e0", "x", slots=1, last_used={"x": NOW - 20}),
                eng("e1", "y", slots=1, last_used={"y": NOW - 30}),
            ],
            (unload("y", "e1", "make_room"), load("a", "e1", "on_demand")),
        ),
        # Without a recorded use, the load time stands in.
        (
            [eng("e0", "x", "y", loaded_at={"x": NOW - 100, "y": NOW - 200})],
            (unload("y", "e0", "make_room"), load("a", "e0", "on_demand")),
        ),
        # Full and nothing reclaimable: no engine can take it now (503 + retry-after).
        ([eng("e0", "x", slots=1, active=frozenset({"x"}))], None),
        ([eng("e0", "x", slots=1, loaded_at={"x": NOW - 1})], None),
        ([eng("e0", "x", slots=1, last_used={"x": NOW - 1})], None),
        ([eng("e0", slots=1, loading=frozenset({"x"}))], None),
        # Other base models, unhealthy engines and engines without slots do not count.
        ([eng("e0", base="qwen"), eng("e1", healthy=False), eng("e2", slots=0)], None),
        ([], None),
    ],
)
def test_choose_for_load(engines: list[EngineSlots], want: Any) -> None:
    assert choose(engines) == want


def test_concurrent_first_loads_spread_over_the_engines() -> None:
    """Loads in flight count before the request load: six first requests for six adapters
    arriving together (a cold start) load on three engines in turn, not all six on the
    least loaded one (vLLM runs one engine's loads one after another, between its steps)."""
    engines = {e.engine_id: e for e in (eng("e0", slots=8, load=0.0),
                                        eng("e1", slots=8, load=3.0),
                                        eng("e2", slots=8, load=5.0))}  # fmt: skip
    placed = []
    for adapter in "abcdef":
        (action,) = choose(list(engines.values()), adapter)
        target = engines[action.engine_id]
        engines[target.engine_id] = dataclasses.replace(target, loading=target.loading | {adapter})
        placed.append(action.engine_id)
    assert placed == ["e0", "e1", "e2", "e0", "e1", "e2"]
    # A free GPU slot still comes first: e0 runs 8 adapters (its next one waits for a slot).
    busy = dataclasses.replace(engines["e0"], loading=frozenset(),
                               active=frozenset(f"r{i}" for i in range(8)))  # fmt: skip
    assert choose([busy, engines["e1"]], "g") == (load("g", "e1", "on_demand"),)


PRE = frozenset({"pre"})


@pytest.mark.parametrize(
    ("engines", "want"),
    [
        # a preload nobody asked for, loaded a second ago: residency and min_idle_s aside
        ([eng("e0", "pre", slots=1, loaded_at={"pre": NOW - 1}, preloaded=PRE)],
         (unload("pre", "e0", "make_room"), load("a", "e0", "on_demand"))),
        # the same adapter once a request asked for it (the book drops it from `preloaded`)
        ([eng("e0", "pre", slots=1, loaded_at={"pre": NOW - 1})], None),
        # still loading or active: never
        ([eng("e0", "pre", slots=1, preloaded=PRE, active=PRE)], None),
        # unasked preloads go before the least recently used adapter (long idle here)
        ([eng("e0", "old", "pre", loaded_at={"pre": NOW - 1}, preloaded=PRE,
              last_used={"old": NOW - 900.0})],
         (unload("pre", "e0", "make_room"), load("a", "e0", "on_demand"))),
    ],
)  # fmt: skip
def test_choose_for_load_reclaims_unasked_preloads_first(
    engines: list[EngineSlots], want: Any
) -> None:
    assert choose(engines) == want


def test_placements_reclaim_unasked_preloads_first() -> None:
    fresh = eng("e0", "pre", slots=1, loaded_at={"pre": NOW - 1}, preloaded=PRE)
    never = AdapterDemand("pre", "llama", 0.0)
    assert run([never, dem("new")], [fresh], preload=True) == [
        unload("pre", "e0", "make_room"),
        load("new", "e0"),
    ]
    asked = dataclasses.replace(fresh, preloaded=frozenset())  # residency protects it
    assert run([never, dem("new")], [asked], preload=True) == []
    both = eng("e0", "old", "pre", loaded_at={"pre": NOW - 1}, preloaded=PRE)
    demand = [never, dem("old", 0.0, last_used=NOW - 900.0), dem("new")]
    assert run(demand, [both], preload=True, hysteresis=0) == [
        unload("pre", "e0", "make_room"),
        load("new", "e0"),
        unload("old", "e0", "idle"),
    ]


def test_choose_for_load_min_residency_is_a_setting() -> None:
    engines = [eng("e0", "x", slots=1, loaded_at={"x": NOW - 1})]
    assert choose(engines, min_residency_s=0.0) is None  # still used within min_idle_s
    assert choose(engines, min_residency_s=0.0, min_idle_s=0.0) == (
        unload("x", "e0", "make_room"),
        load("a", "e0", "on_demand"),
    )


@pytest.mark.parametrize("seed", range(5))
def test_invariants_over_a_random_run(seed: int) -> None:
    """Rounds of shifting demand, each plan applied: slots never overflow, nothing loaded
    less than min_residency_s ago or active is unloaded, every plan stays bounded."""
    rng = random.Random(seed)
    s = PlacementSettings(min_residency_s=20.0, idle_s=60.0, max_actions=5)
    names = [f"a{i}" for i in range(12)]
    loaded: dict[str, dict[str, float]] = {f"e{i}": {} for i in range(3)}
    last: dict[str, float] = {}
    for step in range(200):
        now = step * 2.0
        hot = set(rng.sample(names, 4))
        for name in hot:
            last[name] = now
        demand = [
            AdapterDemand(n, "llama", rng.uniform(0.5, 6.0) if n in hot else 0.0,
                          last_used=last.get(n))
            for n in names
            if n in last
        ]  # fmt: skip
        active = {eid: frozenset(a for a in held if a in hot and rng.random() < 0.3)
                  for eid, held in loaded.items()}  # fmt: skip
        engines = [
            EngineSlots(eid, "llama", 3, dict(held), active=active[eid])
            for eid, held in loaded.items()
        ]
        actions = plan(demand, engines, now=now, settings=s)
        assert len(actions) <= s.max_actions
        for a in actions:
            held = loaded[a.engine_id]
            if a.kind == "unload":
                assert now - held.pop(a.adapter) >= s.min_residency_s
                assert a.adapter not in active[a.engine_id]
            else:
                assert a.adapter not in held
                held[a.adapter] = now
            assert len(held) <= 3


# -- refused loads back off (EngineSlots.blocked) -------------------------------------------


@pytest.mark.parametrize(
    ("failures", "base", "cap", "wait"),
    [(0, 5.0, 300.0, 0.0), (-1, 5.0, 300.0, 0.0), (1, 5.0, 300.0, 5.0), (2, 5.0, 300.0, 10.0),
     (3, 5.0, 300.0, 20.0), (6, 5.0, 300.0, 160.0), (7, 5.0, 300.0, 300.0),
     (10_000, 5.0, 300.0, 300.0), (4, 1.0, 1.0, 1.0)],
)  # fmt: skip
def test_load_backoff_doubles_up_to_the_cap(
    failures: int, base: float, cap: float, wait: float
) -> None:
    s = PlacementSettings(load_backoff_s=base, load_backoff_max_s=cap)
    assert load_backoff(failures, s) == wait


@pytest.mark.parametrize(
    "kw", [{"load_backoff_s": 0.0}, {"load_backoff_s": 10.0, "load_backoff_max_s": 5.0}]
)
def test_backoff_settings_reject_nonsense(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="load_backoff"):
        PlacementSettings(**kw)


@pytest.mark.parametrize(
    ("engines", "expected"),
    [
        # the only engine backs off: no load, and above all no room made for it
        ([eng("e1", "hand", "old", blocked=frozenset({"x"}))], []),
        ([eng("e1", blocked=frozenset({"x"}))], []),
        # backing off on e1 only: loaded on e2 (free slot), though e1 is emptier
        ([eng("e1", blocked=frozenset({"x"})), eng("e2", "b")], [load("x", "e2")]),
        # e2 full: room is made on e2 (not on the blocked e1, whose hand-loaded one stays)
        ([eng("e1", "hand", "old", blocked=frozenset({"x"})), eng("e2", "h2", "o2")],
         [unload("h2", "e2", "make_room"), load("x", "e2")]),
        # another adapter's backoff changes nothing for x
        ([eng("e1", "hand", "old", blocked=frozenset({"y"}))],
         [unload("hand", "e1", "make_room"), load("x", "e1")]),
    ],
)  # fmt: skip
def test_plan_never_loads_nor_makes_room_where_the_load_backs_off(
    engines: list[EngineSlots], expected: list[PlacementAction]
) -> None:
    assert run([dem("x", rate=1.0)], engines) == expected


def test_plan_spreads_only_onto_engines_not_backing_off() -> None:
    engines = [eng("e1", "x"), eng("e2", blocked=frozenset({"x"})), eng("e3")]
    assert run([dem("x", rate=5.0)], engines) == [load("x", "e3", "spread")]


@pytest.mark.parametrize(
    ("engines", "expected"),
    [
        ([eng("e1", "old", "older", blocked=frozenset({"x"}))], None),  # no room made
        ([eng("e1", blocked=frozenset({"x"}))], None),
        ([eng("e1", "x", blocked=frozenset({"x"}))], ()),  # held (by hand): coalesce
        ([eng("e1", blocked=frozenset({"x"})), eng("e2", "a")], (load("x", "e2", "on_demand"),)),
        ([eng("e1", blocked=frozenset({"x"})), eng("e2", "a", "b")],
         (unload("a", "e2", "make_room"), load("x", "e2", "on_demand"))),
    ],
)  # fmt: skip
def test_choose_for_load_skips_engines_backing_off(
    engines: list[EngineSlots], expected: tuple[PlacementAction, ...] | None
) -> None:
    assert choose_for_load("x", "llama", engines, now=NOW, settings=S) == expected


@pytest.mark.parametrize(
    ("engines", "everywhere"),
    [
        ([], False),  # no engine of the base model: not a refusal
        ([eng("e1", blocked=frozenset({"x"}))], True),
        ([eng("e1", blocked=frozenset({"x"})), eng("e2")], False),
        ([eng("e1", blocked=frozenset({"x"})), eng("e2", healthy=False)], True),
        ([eng("e1", blocked=frozenset({"x"})), eng("e2", base="mistral")], True),
        ([eng("e1", blocked=frozenset({"x"})), eng("e2", slots=0)], True),
        ([eng("e1", "x", blocked=frozenset({"x"}))], False),  # an engine holds it
        ([eng("e1", blocked=frozenset({"x"}), loading=frozenset({"x"}))], False),
        ([eng("e1", blocked=frozenset({"x"}), healthy=False)], False),
    ],
)  # fmt: skip
def test_blocked_everywhere(engines: list[EngineSlots], everywhere: bool) -> None:
    assert blocked_everywhere("x", "llama", engines) is everywhere


def test_suppressed_names_wanted_adapters_backing_off_everywhere() -> None:
    engines = [
        eng("e1", blocked=frozenset({"x", "idle", "y"})),
        eng("e2", blocked=frozenset({"x"})),
    ]
    demand = [dem("x"), dem("y"), dem("idle", last_used=NOW - 1000.0), dem("z")]
    assert suppressed(demand, engines, now=NOW, settings=S) == ("x",)
    assert plan(demand, engines, now=NOW, settings=S) == (
        load("y", "e2"), load("z", "e1"),  # x is never planned
    )  # fmt: skip


# -- plan: preload ------------------------------------------------------------------------
def test_preload_fills_free_slots_with_never_requested_adapters_last() -> None:
    never = AdapterDemand("never", "llama", 0.0)  # no last_used: never requested
    engines = [eng("e0", "hot", slots=2), eng("e1", slots=1)]
    demand = [dem("hot", 9.0), dem("cold", 0.1, last_used=NOW - 10.0), never]
    assert run(demand, engines) == [load("hot", "e1", "spread"), load("cold", "e0")]
    assert run(demand, engines, preload=True) == [load("hot", "e1", "spread"), load("cold", "e0")]
    # a free slot left over: the never-requested adapter takes it
    roomy = [eng("e0", "hot", slots=3), eng("e1", slots=1)]
    assert run(demand, roomy, preload=True) == [
        load("hot", "e1", "spread"),
        load("cold", "e0"),
        load("never", "e0", "preload"),
    ]
    # no free slot: a preload never makes room; blocked engines and max_actions hold
    assert run([never], [eng("e0", "x", slots=1)], preload=True) == []
    blocked = eng("e0", slots=1, blocked=frozenset({"never"}))
    assert run([never], [blocked], preload=True) == []
    assert run([never, dem("a")], [eng("e0", slots=2)], preload=True, max_actions=1) == [
        load("a", "e0")
    ]


def test_preloaded_adapters_stay_until_their_slot_is_needed() -> None:
    never = AdapterDemand("never", "llama", 0.0)
    engines = [eng("e0", "never", slots=1)]
    assert run([never], engines, preload=True) == []  # not idle-unloaded
    assert run([never], engines) == [unload("never", "e0", "idle")]
    demand = [never, dem("new", last_used=NOW - 10.0)]
    assert run(demand, engines, preload=True) == [
        unload("never", "e0", "make_room"),
        load("new", "e0"),
    ]
