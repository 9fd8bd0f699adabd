"""Table tests for the not-slow filter and the slowness verdict in engine snapshots."""

from __future__ import annotations

import pytest

from routing.filters import NotSlow
from routing.registry import build_profile, builtin_policies
from routing.state import EngineState
from routing.types import RouteRequest
from tests.routing.helpers import ep


@pytest.mark.parametrize(
    ("slow", "kept"),
    [
        ([False, False], ["e0", "e1"]),
        ([True, False], ["e1"]),
        ([False, True, True], ["e0"]),
        ([True, True], ["e0", "e1"]),  # all slow: keep all (a preference, not an outage)
        ([], []),
    ],
)
def test_not_slow(slow: list[bool], kept: list[str]) -> None:
    endpoints = [ep(f"e{i}", slow=s) for i, s in enumerate(slow)]
    out = NotSlow().filter(RouteRequest(model="m"), endpoints)
    assert [e.id for e in out] == kept


@pytest.mark.parametrize("name", sorted(builtin_policies()))
def test_builtin_policies_avoid_a_slow_engine(name: str) -> None:
    policy = builtin_policies()[name]()
    endpoints = [
        ep("fast", models=frozenset({"m"})),
        ep("slow", models=frozenset({"m"}), slow=True),
    ]
    for seq in range(8):
        decision = policy.choose(RouteRequest(model="m", seq=seq), endpoints)
        assert [e.id for e in decision.ranked] == ["fast"]


def test_profile_may_name_not_slow() -> None:
    policy = build_profile("p", {"filters": ["healthy", "not-slow"]})
    assert [f.name for f in policy.filters] == ["healthy", "not-slow"]


def test_engine_state_carries_the_verdict_and_counts_ttft_samples() -> None:
    state = EngineState("e1", "http://e1")
    assert state.ttft == (None, 0) and not state.snapshot().slow
    for ttft in (0.1, 0.2):
        state.first_token(state.begin(prompt_tokens=4), ttft_s=ttft)
    ewma, samples = state.ttft
    assert samples == 2 and ewma is not None and 0.1 < ewma < 0.2
    before = state.snapshot()
    state.set_slow(True)
    assert state.snapshot().slow and state.snapshot() is not before
    cached = state.snapshot()
    state.set_slow(True)  # no change: the cached snapshot stays
    assert state.snapshot() is cached
    state.set_slow(False)
    assert not state.snapshot().slow
