"""Tied scores go to the least recently routed endpoint: cold traffic rotates at any
concurrency (the peers' ``cache_aware`` sends all of it to one worker below its balance
gate), and an endpoint that joins catches up to its share, then gets its share."""

from __future__ import annotations

from collections import Counter, deque

import pytest

from routing.pickers import MaxScorePicker
from routing.registry import builtin_policies
from routing.state import EngineState, Ticket
from routing.types import RouteRequest
from tests.routing.helpers import ep

PICK = MaxScorePicker()


@pytest.mark.parametrize(
    ("last_seqs", "scores", "expected_first"),
    [
        # all tied: the one routed to longest ago wins
        ([5, 2, 9], [1.0, 1.0, 1.0], "e1"),
        # never routed (-1) beats any history
        ([5, -1, 9], [1.0, 1.0, 1.0], "e1"),
        # a better score wins whatever the history
        ([0, 1, 2], [0.5, 0.5, 0.9], "e2"),
        # scores within tie_epsilon count as tied
        ([7, 3, 8], [0.5 + 1e-9, 0.5, 0.2], "e1"),
    ],
)
def test_ties_least_recently_routed_first(
    last_seqs: list[int], scores: list[float], expected_first: str
) -> None:
    endpoints = [ep(f"e{i}", last_routed_seq=s) for i, s in enumerate(last_seqs)]
    assert PICK.pick(RouteRequest(model="m", seq=11), endpoints, scores)[0].id == expected_first


def test_equal_history_falls_back_to_seq_shuffle() -> None:
    endpoints = [ep("e0"), ep("e1"), ep("e2")]
    heads = Counter(
        PICK.pick(RouteRequest(model="m", seq=s), endpoints, [1.0] * 3)[0].id for s in range(300)
    )
    assert set(heads) == {"e0", "e1", "e2"} and min(heads.values()) > 60


def _closed_loop(policy: str, n_endpoints: int, concurrency: int, n: int) -> Counter[str]:
    """Cold unique prompts, ``concurrency`` in flight, oldest finishes first; routed counts."""
    chooser = builtin_policies()[policy]()
    states = {f"e{i}": EngineState(f"e{i}", f"http://e{i}") for i in range(n_endpoints)}
    for st in states.values():
        st.set_models(frozenset({"m"}))
    in_flight: deque[tuple[EngineState, Ticket]] = deque()
    counts: Counter[str] = Counter()
    for seq in range(n):
        if len(in_flight) == concurrency:
            st, ticket = in_flight.popleft()
            st.first_token(ticket, ttft_s=0.05)
            st.finish(ticket)
        req = RouteRequest(model="m", seq=seq, prompt_tokens=1200, max_tokens=64)
        chosen = chooser.choose(req, [s.snapshot() for s in states.values()]).ranked[0]
        st = states[chosen.id]
        in_flight.append((st, st.begin(prompt_tokens=1200, max_tokens=64, seq=seq)))
        counts[chosen.id] += 1
    return counts


@pytest.mark.parametrize("policy", ["prefix-cache", "least-request"])
@pytest.mark.parametrize("n_endpoints", [2, 4])
@pytest.mark.parametrize("concurrency", [1, 2, 3, 8, 16, 32])
def test_cold_traffic_splits_within_10_percent_at_every_concurrency(
    policy: str, n_endpoints: int, concurrency: int
) -> None:
    n = 40 * n_endpoints
    counts = _closed_loop(policy, n_endpoints, concurrency, n)
    fair = n / n_endpoints
    assert len(counts) == n_endpoints
    assert max(abs(c - fair) / fair for c in counts.values()) <= 0.10, counts


def test_a_joining_endpoint_catches_up_then_the_split_is_even() -> None:
    chooser = builtin_policies()["prefix-cache"]()
    states = [EngineState(f"e{i}", f"http://e{i}") for i in range(3)]
    for st in states:
        st.set_models(frozenset({"m"}))

    def route_one(seq: int) -> str:  # sequential: the previous request has finished
        snaps = [s.snapshot() for s in states]
        chosen = chooser.choose(RouteRequest(model="m", seq=seq, prompt_tokens=500), snaps)
        st = next(s for s in states if s.endpoint_id == chosen.ranked[0].id)
        st.finish(st.begin(prompt_tokens=500, seq=seq))
        return st.endpoint_id

    before = Counter(route_one(seq) for seq in range(900))
    assert set(before.values()) == {300}, before
    states.append(EngineState("e3", "http://e3"))
    states[-1].set_models(frozenset({"m"}))
    # The newcomer takes new work until its recent share matches (it has none), not forever...
    catch_up = Counter(route_one(seq) for seq in range(900, 1300))
    assert 100 <= catch_up["e3"] <= 200, catch_up
    # ...and then every endpoint gets its quarter.
    after = Counter(route_one(seq) for seq in range(1300, 1700))
    assert max(abs(c - 100) for c in after.values()) <= 10, after
