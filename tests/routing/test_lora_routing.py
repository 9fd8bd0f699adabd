"""Table tests for LoRA-aware routing: the adapter filter tiers, the affinity scorer, their
wiring into every built-in policy, and the snapshot fields they read."""

from __future__ import annotations

from typing import Any

import pytest

from routing.filters import ServesAdapter, ServesModel
from routing.metrics_parser import EngineMetrics
from routing.policy import NoEndpointError, Policy
from routing.registry import build_policies, build_profile, builtin_policies
from routing.scorers.least_request import LeastRequest
from routing.scorers.lora import LoraAffinity
from routing.state import EngineState
from routing.types import EndpointSnapshot, RouteRequest
from tests.routing.helpers import ep

BASE = "llama"
REQ = RouteRequest(model=BASE, adapter="sql")


def lep(eid: str, *adapters: str, loading: tuple[str, ...] = (), **kw: Any) -> EndpointSnapshot:
    """An engine serving BASE with ``adapters`` loaded (listed in its models)."""
    kw.setdefault("max_loras", 2)
    return ep(
        eid,
        models=frozenset({BASE, *adapters}),
        adapters=frozenset(adapters),
        loading_adapters=frozenset(loading),
        **kw,
    )


LOADED = lep("loaded", "sql")
LOADING = lep("loading", loading=("sql",))
FREE = lep("free", "x")
FULL = lep("full", "x", "y")
UNKNOWN_SLOTS = lep("unknown-slots", max_loras=None)
OTHER_BASE = ep("other", models=frozenset({"qwen"}), max_loras=4)
NO_LIST = ep("no-list")  # model list not fetched yet: may serve anything


# -- filter ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("endpoints", "kept"),
    [
        ([LOADED, LOADING, FREE, FULL], ["loaded"]),
        ([LOADING, FREE, FULL], ["loading"]),
        ([FREE, FULL, UNKNOWN_SLOTS, OTHER_BASE], ["free"]),
        ([FULL, UNKNOWN_SLOTS, OTHER_BASE], []),
        ([lep("a", "sql"), LOADING, lep("b", "sql")], ["a", "b"]),  # every replica
        ([NO_LIST, FREE], ["no-list"]),  # as ServesModel: unknown lists may serve anything
        ([NO_LIST, LOADED], ["no-list", "loaded"]),
        ([], []),
    ],
)
def test_adapter_filter_tiers(endpoints: list[EndpointSnapshot], kept: list[str]) -> None:
    assert [e.id for e in ServesAdapter().filter(REQ, endpoints)] == kept


@pytest.mark.parametrize(
    ("endpoints", "kept"),
    [
        ([LOADED, LOADING, FREE, FULL], ["loaded"]),
        ([LOADING, FREE, FULL], []),  # the gateway loads before routing: never a 404 engine
        ([NO_LIST, FREE], ["no-list"]),
    ],
)
def test_serves_model_keeps_only_engines_listing_the_adapter(
    endpoints: list[EndpointSnapshot], kept: list[str]
) -> None:
    assert [e.id for e in ServesModel().filter(REQ, endpoints)] == kept


def test_base_model_requests_unaffected_by_the_filters() -> None:
    endpoints = [LOADED, FULL, OTHER_BASE, NO_LIST]
    req = RouteRequest(model=BASE)
    assert ServesAdapter().filter(req, endpoints) == endpoints
    assert [e.id for e in ServesModel().filter(req, endpoints)] == ["loaded", "full", "no-list"]


def test_free_slots_count_loading_adapters() -> None:
    assert lep("e", "x", loading=("y",)).free_lora_slots == 0
    assert lep("e", "x", loading=("x",)).free_lora_slots == 1
    assert lep("e", "x", "y", "z").free_lora_slots == 0  # hand-loaded beyond max_loras
    assert lep("e", max_loras=None).free_lora_slots == 0


# -- scorer ---------------------------------------------------------------------------------
ACTIVE = lep("active", "sql", running_adapters=frozenset({"sql"}))


@pytest.mark.parametrize(
    ("endpoint", "score"),
    [
        (ACTIVE, 1.0),
        (LOADED, 0.9),
        (LOADING, 0.6),
        (FREE, 0.3),
        (FULL, 0.0),
        (UNKNOWN_SLOTS, 0.0),
        (OTHER_BASE, 0.0),
        (NO_LIST, 0.0),
    ],
)
def test_lora_affinity_scores(endpoint: EndpointSnapshot, score: float) -> None:
    assert LoraAffinity().score(REQ, [endpoint]) == [score]


def test_lora_affinity_is_neutral_for_base_models_and_checks_its_order() -> None:
    assert LoraAffinity().score(RouteRequest(model=BASE), [FULL, FREE]) == [1.0, 1.0]
    with pytest.raises(ValueError):
        LoraAffinity(loading=0.2, free_slot=0.3)


# -- policies -------------------------------------------------------------------------------
SCORING = sorted(name for name, p in build_policies(builtin_policies()).items() if p.scorers)


def test_every_scoring_builtin_policy_uses_the_lora_scorer() -> None:
    policies = build_policies(builtin_policies())
    assert SCORING == [
        "fairness", "least-kv-cache", "least-latency", "least-request", "power-of-two",
        "prefix-cache", "session-affinity", "throughput",
    ]  # fmt: skip
    for name in SCORING:
        assert any(isinstance(s, LoraAffinity) for s, _ in policies[name].scorers), name
    for policy in policies.values():
        assert [type(f) for f in policy.filters if isinstance(f, ServesModel | ServesAdapter)] == [
            ServesModel
        ]


@pytest.mark.parametrize("name", SCORING)
def test_base_model_scores_unchanged_by_the_lora_scorer(name: str) -> None:
    policy = build_policies(builtin_policies())[name]
    without = Policy(
        name=name,
        filters=policy.filters,
        scorers=tuple(sw for sw in policy.scorers if not isinstance(sw[0], LoraAffinity)),
        picker=policy.picker,
    )
    endpoints = [
        ep(f"e{i}", models=frozenset({BASE}), in_flight=i, kv_usage=0.1 * i, ttft_ewma_s=0.1 * i)
        for i in range(4)
    ]
    for seq in range(6):
        req = RouteRequest(model=BASE, seq=seq, prompt_tokens=100 * seq, session_key="s")
        assert policy.choose(req, endpoints) == without.choose(req, endpoints)


@pytest.mark.parametrize("name", sorted(builtin_policies()))
def test_adapter_requests_go_where_the_adapter_is(name: str) -> None:
    policy = build_policies(builtin_policies())[name]
    busy = lep("busy", "sql", in_flight=50)  # the only replica, heavily loaded
    endpoints = [lep("idle", "x", in_flight=0), busy, FULL]
    for seq in range(8):
        decision = policy.choose(RouteRequest(model=BASE, adapter="sql", seq=seq), endpoints)
        assert [e.id for e in decision.ranked] == ["busy"]  # no failover to a 404


def test_affinity_prefers_the_active_replica_until_load_outweighs_it() -> None:
    policy = build_policies(builtin_policies())["least-request"]

    def first(active_load: int, idle_load: int) -> str:
        endpoints = [
            lep("warm", "sql", in_flight=active_load, running_adapters=frozenset({"sql"})),
            lep("cold", "sql", in_flight=idle_load),
        ]
        return policy.choose(RouteRequest(model=BASE, adapter="sql"), endpoints).ranked[0].id

    assert first(10, 10) == "warm"
    assert first(20, 19) == "warm"  # a warm GPU slot outweighs 5 % of the load
    assert first(10, 5) == "cold"


def test_adapter_scorer_weight_counts_only_for_adapter_requests() -> None:
    policy = Policy(
        name="p",
        filters=(),
        scorers=((LeastRequest(), 1.0), (LoraAffinity(), 3.0)),
        picker=build_policies(builtin_policies())["least-request"].picker,
    )
    assert policy.base_scorers == ((LeastRequest(), 1.0),)
    endpoints = [lep("a", "sql", in_flight=1), FREE]
    adapter = policy.choose(RouteRequest(model=BASE, adapter="sql"), endpoints)
    assert dict(adapter.scores) == {"a": (0.0 + 3 * 0.9) / 4, "free": (1.0 + 3 * 0.3) / 4}
    base = policy.choose(RouteRequest(model=BASE), endpoints)
    assert dict(base.scores) == {"a": 0.0, "free": 1.0}


@pytest.mark.parametrize(
    "endpoints", [[FULL, OTHER_BASE], [FREE, LOADING]], ids=["no-slot", "not-listed"]
)
def test_builtin_policies_need_an_engine_listing_the_adapter(
    endpoints: list[EndpointSnapshot],
) -> None:
    policy = build_policies(builtin_policies())["least-request"]
    with pytest.raises(NoEndpointError) as exc:
        policy.choose(REQ, endpoints)
    assert exc.value.reason == "serves-model"


def test_profiles_name_the_lora_plugins() -> None:
    policy = build_profile(
        "p",
        {"filters": ["healthy", "serves-adapter"],
         "scorers": [{"type": "lora-affinity", "weight": 2, "loading": 0.5}]},
    )  # fmt: skip
    assert [f.name for f in policy.filters] == ["healthy", "serves-adapter"]
    scorer, weight = policy.scorers[0]
    assert isinstance(scorer, LoraAffinity) and scorer.loading == 0.5 and weight == 2.0
    ranked = policy.choose(REQ, [FREE, LOADING]).ranked
    assert [e.id for e in ranked] == ["loading"]


# -- snapshot fields (routing/state.py) -------------------------------------------------------
def test_snapshot_carries_adapters_loading_and_slots() -> None:
    st = EngineState("e", "http://e")
    st.set_models(frozenset({BASE, "sql", "x"}), adapters=frozenset({"sql", "x"}))
    st.set_lora_slots(4, frozenset({"new"}))
    snap = st.snapshot()
    assert (snap.adapters, snap.loading_adapters, snap.max_loras) == (
        frozenset({"sql", "x"}),
        frozenset({"new"}),
        4,
    )
    assert snap.free_lora_slots == 1
    assert st.snapshot() is snap  # cached until a change
    st.set_lora_slots(4, frozenset({"new"}))
    st.set_models(frozenset({BASE, "sql", "x"}), adapters=frozenset({"sql", "x"}))
    assert st.snapshot() is snap  # no change, no new snapshot


def test_scraped_max_lora_wins_over_the_configured_one() -> None:
    st = EngineState("e", "http://e")
    st.set_lora_slots(8, frozenset())
    assert st.snapshot().max_loras == 8
    st.observe_metrics(EngineMetrics(max_lora=2), at=1.0)
    assert st.snapshot().max_loras == 2
    st.set_lora_slots(None, frozenset())
    st.observe_metrics(EngineMetrics(), at=2.0)
    assert st.snapshot().max_loras is None


def test_set_models_without_adapters_keeps_those_still_served() -> None:
    st = EngineState("e", "http://e")
    st.set_models(frozenset({BASE, "sql", "x"}), adapters=frozenset({"sql", "x"}))
    st.set_models(frozenset({BASE, "sql"}))
    assert st.snapshot().adapters == frozenset({"sql"})
    assert st.snapshot().models == frozenset({BASE, "sql"})
