from __future__ import annotations

import pytest

from routing.registry import builtin_policies
from routing.scorers.session_affinity import SessionAffinity, rendezvous_order
from routing.types import RouteRequest
from tests.routing.helpers import ep, eps


@pytest.mark.parametrize(
    ("session", "user"),
    [("s1", None), (None, "alice"), ("s1", "alice"), ("x" * 300, None)],
)
def test_owner_scores_one_others_at_most_half(session: str | None, user: str | None) -> None:
    endpoints = eps(4)
    scores = SessionAffinity().score(
        RouteRequest(model="m", session_key=session, user=user), endpoints
    )
    assert sorted(scores) == pytest.approx([0.0, 1 / 6, 1 / 3, 1.0])
    owner = rendezvous_order(session or user or "", [e.id for e in endpoints])[0]
    assert scores[[e.id for e in endpoints].index(owner)] == 1.0


def test_session_key_wins_over_user() -> None:
    endpoints = eps(8)
    a = SessionAffinity().score(RouteRequest(model="m", session_key="s", user="u"), endpoints)
    b = SessionAffinity().score(RouteRequest(model="m", session_key="s"), endpoints)
    assert a == b


@pytest.mark.parametrize("n", [0, 1, 3])
def test_no_key_is_neutral(n: int) -> None:
    assert SessionAffinity().score(RouteRequest(model="m"), eps(n)) == [1.0] * n


def test_single_endpoint_owner() -> None:
    assert SessionAffinity().score(RouteRequest(model="m", user="u"), [ep("only")]) == [1.0]


def test_removing_an_endpoint_moves_only_its_keys() -> None:
    ids = [f"e{i}" for i in range(5)]
    keys = [f"session-{k}" for k in range(2000)]
    before = {k: rendezvous_order(k, ids)[0] for k in keys}
    after = {k: rendezvous_order(k, ids[:2] + ids[3:])[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "e2"}
    # and the load is spread: every endpoint owns 15-25 % of the keys
    for eid in ids:
        share = sum(1 for v in before.values() if v == eid) / len(keys)
        assert 0.15 < share < 0.25


def test_adding_an_endpoint_moves_keys_only_to_it() -> None:
    ids = [f"e{i}" for i in range(4)]
    keys = [f"k{k}" for k in range(1000)]
    before = {k: rendezvous_order(k, ids)[0] for k in keys}
    after = {k: rendezvous_order(k, [*ids, "e9"])[0] for k in keys}
    assert all(after[k] in (before[k], "e9") for k in keys)


def test_policy_sticks_and_breaks_ties_by_load_without_key() -> None:
    policy = builtin_policies()["session-affinity"]()
    endpoints = [ep("a", in_flight=5), ep("b", in_flight=0), ep("c", in_flight=9)]
    owners = {
        policy.choose(RouteRequest(model="m", seq=s, session_key="s1"), endpoints).ranked[0].id
        for s in range(20)
    }
    assert len(owners) == 1
    assert policy.choose(RouteRequest(model="m"), endpoints).ranked[0].id == "b"
