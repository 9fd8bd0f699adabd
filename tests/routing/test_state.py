from __future__ import annotations

import pytest

from routing.metrics_parser import EngineMetrics
from routing.state import DEFAULT_OUTPUT_TOKENS, EngineState
from routing.types import RECENT_WINDOW, recent_placed_at


def test_begin_counts_immediately() -> None:
    st = EngineState("e1", "http://e1")
    st.begin(prompt_tokens=1000, max_tokens=100, cached_tokens=600)
    st.begin(prompt_tokens=50)
    snap = st.snapshot()
    assert snap.in_flight == 2
    assert snap.in_flight_tokens == 1100 + 50 + DEFAULT_OUTPUT_TOKENS
    assert snap.prefill_tokens == 400 + 50


@pytest.mark.parametrize(
    ("calls", "in_flight", "prefill"),
    [
        (["finish"], 0, 0),
        (["finish", "finish"], 0, 0),
        (["first", "finish"], 0, 0),
        (["first", "first"], 1, 0),
        (["first"], 1, 0),
        ([], 1, 300),
        (["finish", "first"], 0, 0),
    ],
)
def test_ticket_release_is_exact_and_idempotent(
    calls: list[str], in_flight: int, prefill: int
) -> None:
    st = EngineState("e1", "http://e1")
    t = st.begin(prompt_tokens=300, max_tokens=10)
    for call in calls:
        if call == "first":
            st.first_token(t, ttft_s=0.1)
        else:
            st.finish(t)
    snap = st.snapshot()
    assert (snap.in_flight, snap.prefill_tokens) == (in_flight, prefill)
    assert snap.in_flight_tokens == (310 if in_flight else 0)


def test_ewma() -> None:
    st = EngineState("e1", "http://e1", alpha=0.5)
    a = st.begin(prompt_tokens=10)
    b = st.begin(prompt_tokens=10)
    st.first_token(a, ttft_s=1.0)
    st.first_token(b, ttft_s=3.0)
    st.tokens(a, n=2, itl_s=0.2)
    st.tokens(a, n=1, itl_s=0.3)
    st.tokens(a, n=0, itl_s=0.3)  # no tokens: ignored for the EWMA
    snap = st.snapshot()
    assert snap.ttft_ewma_s == pytest.approx(2.0)
    assert snap.itl_ewma_s == pytest.approx(0.2)
    assert st.output_tokens_total == 3
    st.finish(a)
    st.tokens(a, n=5)  # after finish: ignored
    assert st.output_tokens_total == 3 and st.completed == 1


def test_snapshot_is_cached_until_mutation() -> None:
    st = EngineState("e1", "http://e1")
    s1 = st.snapshot()
    assert st.snapshot() is s1
    st.set_health(True)  # no change: cache kept
    assert st.snapshot() is s1
    st.set_health(False)
    s2 = st.snapshot()
    assert s2 is not s1 and not s2.healthy
    st.set_models(frozenset({"m"}))
    assert st.snapshot().models == frozenset({"m"})
    st.set_models(frozenset({"m"}))


def test_metrics_flow_into_snapshot() -> None:
    st = EngineState("e1", "http://e1")
    m = EngineMetrics(
        running=3,
        waiting=2,
        kv_usage=0.5,
        block_size=16,
        running_adapters=frozenset({"a"}),
        waiting_adapters=frozenset({"b"}),
    )
    st.observe_metrics(m, at=12.5)
    snap = st.snapshot()
    assert (snap.running, snap.waiting, snap.kv_usage, snap.block_size) == (3, 2, 0.5, 16)
    assert snap.scraped_at == 12.5
    assert snap.running_adapters == frozenset({"a", "b"})
    assert snap.load == 5
    assert st.metrics is m


@pytest.mark.parametrize("alpha", [0.0, -1.0, 1.5])
def test_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError):
        EngineState("e", "u", alpha=alpha)


def test_begin_records_the_latest_routed_seq() -> None:
    st = EngineState("e", "http://e")
    assert st.snapshot().last_routed_seq == -1
    st.begin(prompt_tokens=10, seq=7)
    st.begin(prompt_tokens=10)  # no seq (e.g. a caller without a RouteRequest): unchanged
    assert st.snapshot().last_routed_seq == 7
    st.begin(prompt_tokens=10, seq=3)  # a late failover attempt never moves it back
    assert st.snapshot().last_routed_seq == 7


def test_begin_counts_placements_beside_routed_requests() -> None:
    st = EngineState("e", "http://e")
    st.begin(prompt_tokens=10, seq=0, placed=True)
    st.begin(prompt_tokens=10, seq=1)
    st.begin(prompt_tokens=10, seq=2, placed=True)
    snap = st.snapshot()
    decay = 1.0 - 1.0 / RECENT_WINDOW
    assert snap.recent_routed == pytest.approx(decay**2 + decay + 1)
    assert snap.recent_placed == pytest.approx(decay**2 + 1)
    # both read decayed to a later request, from the same last_routed_seq
    assert recent_placed_at(snap, 12) == pytest.approx(snap.recent_placed * decay**10)
    st.begin(prompt_tokens=10, seq=1, placed=True)  # stale seq: neither counter moves
    assert st.snapshot().recent_placed == snap.recent_placed


@pytest.mark.parametrize(
    ("remote", "snapshot_counts"),
    [
        ((0, 0, 0), (1, 310, 300)),
        ((2, 500, 120), (3, 810, 420)),
        ((1, 0, 0), (2, 310, 300)),
    ],
)
def test_remote_counts_add_to_the_snapshot_and_stay_out_of_the_local_load(
    remote: tuple[int, int, int], snapshot_counts: tuple[int, int, int]
) -> None:
    st = EngineState("e", "http://e")
    st.begin(prompt_tokens=300, max_tokens=10)
    before = st.snapshot()
    st.set_remote(in_flight=remote[0], in_flight_tokens=remote[1], prefill_tokens=remote[2])
    snap = st.snapshot()
    assert (snap.in_flight, snap.in_flight_tokens, snap.prefill_tokens) == snapshot_counts
    assert (snap is before) == (remote == (0, 0, 0))  # unchanged counts keep the cache
    assert st.local_load() == (1, 310, 300)
    assert st.remote_load == remote
    st.set_remote()  # replaced wholesale: nothing sticks
    assert st.snapshot().in_flight == 1

