from __future__ import annotations

import pytest

from routing.fairness import VirtualTokenCounters
from routing.registry import builtin_policies
from routing.scorers.fairness import Fairness
from routing.scorers.session_affinity import rendezvous_order
from routing.types import FairnessView, RouteRequest
from tests.routing.helpers import ep, eps


def test_counters_charge_with_weights() -> None:
    vtc = VirtualTokenCounters(input_weight=1.0, output_weight=2.0)
    vtc.admit("a")
    vtc.charge("a", input_tokens=100, output_tokens=10)
    assert vtc.counter("a") == 120.0
    assert len(vtc) == 1


def test_counter_lift_on_reactivation() -> None:
    vtc = VirtualTokenCounters()
    vtc.admit("busy")
    vtc.charge("busy", input_tokens=5000)
    vtc.admit("idle")  # lifted to the active minimum (5000), not 0
    assert vtc.counter("idle") == 5000.0
    vtc.release("idle")
    vtc.charge("busy", input_tokens=1000)
    view = vtc.admit("idle")  # lifted again to 6000
    assert view.counter == 6000.0 and view.low == 6000.0 and view.active_users == 2


def test_no_lift_downwards() -> None:
    vtc = VirtualTokenCounters()
    vtc.admit("heavy")
    vtc.charge("heavy", input_tokens=9000)
    vtc.release("heavy")
    vtc.admit("light")
    assert vtc.admit("heavy").counter == 9000.0


def test_release_is_counted_and_idempotent() -> None:
    vtc = VirtualTokenCounters()
    vtc.admit("a")
    vtc.admit("a")
    vtc.release("a")
    assert vtc.view("a").active_users == 1
    vtc.release("a")
    vtc.release("a")
    vtc.release("ghost")
    assert vtc.view("a").active_users == 0


def test_charge_unknown_user_starts_at_active_minimum() -> None:
    vtc = VirtualTokenCounters()
    vtc.admit("a")
    vtc.charge("a", input_tokens=50)
    vtc.charge("new", input_tokens=1)
    assert vtc.counter("new") == 51.0


def test_user_table_is_bounded_and_keeps_active_users() -> None:
    vtc = VirtualTokenCounters(max_users=3)
    vtc.admit("active")
    for i in range(10):
        vtc.charge(f"u{i}", input_tokens=1)
    assert len(vtc) == 3
    assert vtc.view("active").active_users == 1
    assert "active" in vtc._counters


def test_bad_max_users() -> None:
    with pytest.raises(ValueError):
        VirtualTokenCounters(max_users=0)


@pytest.mark.parametrize(
    ("view", "user", "expected"),
    [
        (None, "u", 0.0),
        (FairnessView(counter=100, low=0, high=100, active_users=1), "u", 0.0),
        (FairnessView(counter=0, low=0, high=50_000, active_users=3), "u", 0.0),
        (FairnessView(counter=50_000, low=0, high=50_000, active_users=3), "u", 1.0),
        (FairnessView(counter=25_000, low=0, high=50_000, active_users=3), "u", 0.5),
        (FairnessView(counter=5_000, low=0, high=5_000, active_users=2), "u", 0.5),  # scale floor
        (FairnessView(counter=50_000, low=0, high=50_000, active_users=3), None, 0.0),
    ],
)
def test_share(view: FairnessView | None, user: str | None, expected: float) -> None:
    assert Fairness().share(RouteRequest(model="m", user=user, fairness=view)) == expected


def test_light_user_goes_to_least_loaded_heavy_user_home() -> None:
    endpoints = [ep("e0", in_flight=8), ep("e1", in_flight=0), ep("e2", in_flight=4)]
    policy = builtin_policies()["fairness"]()
    light = RouteRequest(model="m", user="u", fairness=FairnessView(0, 0, 90_000, 4))
    assert policy.choose(light, endpoints).ranked[0].id == "e1"
    home = rendezvous_order("hog", [e.id for e in endpoints])[0]
    heavy = RouteRequest(model="m", user="hog", fairness=FairnessView(90_000, 0, 90_000, 4))
    assert policy.choose(heavy, endpoints).ranked[0].id == home


def test_without_user_it_is_least_request() -> None:
    scores = Fairness().score(RouteRequest(model="m"), [ep("a", in_flight=2), ep("b")])
    assert scores == [0.0, 1.0]
    assert Fairness().score(RouteRequest(model="m"), eps(2)) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("charges", "tracked", "taken"),
    [
        ([("a", 100, 0), ("a", 0, 10), ("b", 5, 0)], True, {"a": 120.0, "b": 5.0}),
        ([("a", 100, 0)], False, {}),
        ([], True, {}),
        ([("a", 1, 0), ("b", 1, 0), ("c", 1, 0)], True, {"a": 1.0, "b": 1.0}),  # max_users
    ],
)
def test_tracked_charges_are_summed_per_user_until_taken(
    charges: list[tuple[str, int, int]], tracked: bool, taken: dict[str, float]
) -> None:
    vtc = VirtualTokenCounters(max_users=2)
    if tracked:
        vtc.track_charges()
        vtc.track_charges()  # idempotent: keeps the sums
    for user, inp, out in charges:
        vtc.charge(user, input_tokens=inp, output_tokens=out)
    assert vtc.take_charges() == taken
    assert vtc.take_charges() == {}


@pytest.mark.parametrize(
    ("local", "remote", "expected"),
    [
        ({"a": 100}, {"a": 50.0}, {"a": 150.0}),
        ({"a": 100}, {"b": 70.0}, {"a": 100.0, "b": 70.0}),
        ({}, {}, {}),
    ],
)
def test_remote_service_adds_to_counters_and_is_not_published_again(
    local: dict[str, int], remote: dict[str, float], expected: dict[str, float]
) -> None:
    vtc = VirtualTokenCounters()
    vtc.track_charges()
    for user, tokens in local.items():
        vtc.charge(user, input_tokens=tokens)
    published = vtc.take_charges()
    vtc.add_remote(remote)
    assert {u: vtc.counter(u) for u in expected} == expected
    assert published == {u: float(t) for u, t in local.items()}
    assert vtc.take_charges() == {}


def test_remote_service_for_an_unknown_user_starts_at_the_active_minimum() -> None:
    vtc = VirtualTokenCounters()
    vtc.admit("busy")
    vtc.charge("busy", input_tokens=1000)
    vtc.add_remote({"new": 10.0})
    assert vtc.counter("new") == 1010.0
