"""Table tests for the pure failover state machines: outlier ejection, the retry budget and
the slow-engine detector (:mod:`gateway.outliers`), driven by a hand-moved clock; then the
same through a real gateway: a failing engine ejected and readmitted, a retry storm held to
the budget, a slow engine avoided."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from gateway.outliers import (
    LatencyView,
    OutlierDetector,
    Outliers,
    Phase,
    RetryBudget,
    SlowDetector,
    slow_candidates,
)
from gateway.settings import OutlierSettings
from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.fakeupstream import FakeEngine


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pool(engines: int = 4, **kw: Any) -> tuple[Outliers, list[OutlierDetector], Clock]:
    clock = Clock()
    settings = OutlierSettings(**{"consecutive_failures": 3, "base_ejection_s": 5.0,
                                  "max_ejection_s": 60.0, **kw})  # fmt: skip
    outliers = Outliers(settings, clock=clock)
    return outliers, [outliers.detector() for _ in range(engines)], clock


def fail(detector: OutlierDetector, n: int = 1) -> list[bool]:
    return [detector.failure(probe=detector.take_probe()) for _ in range(n)]


@pytest.mark.parametrize(
    ("events", "ejected"),
    [
        ("FFF", True),
        ("FF", False),
        ("FFSFF", False),  # a success resets the count
        ("FFSFFF", True),
        ("SSSFFF", True),
    ],
)
def test_consecutive_failures_eject(events: str, ejected: bool) -> None:
    _, (det, *_), _ = pool()
    for event in events:
        if event == "F":
            det.failure(probe=False)
        else:
            det.success(probe=False)
    assert (det.phase is Phase.EJECTED) is ejected
    assert det.routable() is not ejected


def test_ejection_time_doubles_per_failed_probe_and_is_capped() -> None:
    outliers, (det, *_), clock = pool()
    assert fail(det, 3) == [False, False, True]
    durations = []
    for _ in range(6):
        durations.append(det.remaining_s())
        clock.now = det.until  # the time is up: half-open
        assert det.routable() and det.phase is Phase.HALF_OPEN
        assert fail(det) == [True]  # the probe failed: ejected again
    assert durations == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert det.ejections == 7 and outliers.out == 1


def test_half_open_lets_exactly_one_probe_through() -> None:
    outliers, (det, *_), clock = pool()
    fail(det, 3)
    assert not det.routable() and not det.take_probe()
    clock.now = det.until - 0.001
    assert not det.routable()
    clock.now = det.until
    assert det.routable()
    assert det.take_probe()  # the probe is out...
    assert not det.routable() and not det.take_probe()  # ...and nobody else may go
    det.probe_ended()  # the probe's client left without an outcome: another may probe
    assert det.routable() and det.take_probe()
    det.success(probe=False)  # an older request's outcome: ignored, the probe decides
    det.failure(probe=False)
    assert det.phase is Phase.HALF_OPEN and det.probing
    det.success(probe=True)
    assert det.closed and det.routable() and outliers.out == 0
    assert not det.take_probe()  # closed: requests are not probes


def test_readmitted_engine_needs_consecutive_failures_again_and_count_decays() -> None:
    _, (det, *_), clock = pool()
    fail(det, 3)
    clock.now = det.until
    det.success(probe=det.take_probe())
    assert fail(det, 2) == [False, False]  # readmitted with a fresh count
    assert fail(det, 1) == [True]
    assert det.remaining_s() == 10.0  # ejected recently: twice as long
    clock.now = det.until
    det.success(probe=det.take_probe())
    clock.now += 60.0  # one max_ejection_s readmitted: one step of decay
    fail(det, 3)
    assert det.remaining_s() == 10.0
    clock.now = det.until
    det.success(probe=det.take_probe())
    clock.now += 600.0  # long calm: back to the base time
    fail(det, 3)
    assert det.remaining_s() == 5.0


@pytest.mark.parametrize(
    ("engines", "fraction", "ejectable"),
    [
        (4, 0.5, 2),
        (2, 0.5, 1),
        (1, 0.5, 0),  # a lone engine is never ejected
        (3, 0.5, 1),  # rounded down
        (10, 0.29, 2),
        (100, 0.29, 29),  # no float truncation below an integer
        (4, 1.0, 4),
        (4, 0.0, 0),
    ],
)
def test_never_more_than_the_fraction_out(engines: int, fraction: float, ejectable: int) -> None:
    outliers, dets, clock = pool(engines, max_ejected_fraction=fraction)
    for det in dets:
        fail(det, 3)
    assert sum(det.phase is Phase.EJECTED for det in dets) == ejectable == outliers.out
    # Half-open still counts as out: nobody else may go until a probe readmits one.
    clock.now += 5.0
    spare = [det for det in dets if det.phase is Phase.CLOSED]
    if spare and ejectable:
        assert fail(spare[0]) == [False]
        readmit = next(det for det in dets if det.phase is Phase.EJECTED)
        assert readmit.routable()
        readmit.success(probe=readmit.take_probe())
        assert fail(spare[0]) == [True]  # room again: the next failure ejects


def test_retired_engine_frees_its_place() -> None:
    outliers, (a, b), _ = pool(2)
    fail(a, 3)
    assert outliers.out == 1 and outliers.size == 2
    outliers.retire(a)
    assert outliers.out == 0 and outliers.size == 1 and a.phase is Phase.CLOSED
    assert fail(b, 3) == [False, False, False]  # alone now: never ejected
    outliers.retire(b)
    assert outliers.size == 0


def budget(**kw: Any) -> tuple[RetryBudget, Clock]:
    clock = Clock()
    base = {"retry_budget_ratio": 0.2, "retry_budget_min_per_s": 0.0, "retry_budget_window_s": 10.0}
    return RetryBudget(OutlierSettings(**{**base, **kw}), clock=clock), clock


@pytest.mark.parametrize(
    ("kw", "requests", "allowed"),
    [
        ({}, 100, 20),
        ({}, 10, 2),
        ({}, 0, 0),
        ({"retry_budget_ratio": 0.0}, 100, 0),
        ({"retry_budget_ratio": 1.0}, 7, 7),
        ({"retry_budget_min_per_s": 0.5}, 0, 5),  # quiet gateway: 0.5/s x 10 s
        ({"retry_budget_min_per_s": 0.5}, 100, 25),
    ],
)
def test_retry_budget_ratio_and_floor(kw: dict[str, Any], requests: int, allowed: int) -> None:
    b, _ = budget(**kw)
    for _ in range(requests):
        b.request()
    granted = sum(b.retry() for _ in range(requests + 50))
    assert granted == allowed
    assert b.exhausted == requests + 50 - allowed


def test_retry_budget_window_slides() -> None:
    b, clock = budget()
    for _ in range(50):
        b.request()
    assert sum(b.retry() for _ in range(20)) == 10
    clock.now += 5.0  # half a window later: the requests still count, so do the retries
    assert not b.retry()
    for _ in range(50):
        b.request()
    assert sum(b.retry() for _ in range(20)) == 10
    clock.now += 5.0  # the first 50 requests (and their 10 retries) fell out
    assert b.window() == (50, 10)
    assert not b.retry()
    clock.now += 100.0  # long idle: everything fell out, no negative counts
    assert b.window() == (0, 0)
    assert not b.retry()


def view(eid: str, ttft: float | None, *, samples: int = 20, models: str = "m",
         healthy: bool = True) -> LatencyView:  # fmt: skip
    return LatencyView(eid, frozenset(models.split()) if models else frozenset(), healthy,
                       ttft, samples)  # fmt: skip


@pytest.mark.parametrize(
    ("views", "slow"),
    [
        ([view("a", 0.1), view("b", 0.1), view("c", 1.0)], {"c"}),
        ([view("a", 0.1), view("b", 0.31)], {"b"}),  # against the median of its peers
        ([view("a", 0.1), view("b", 0.29)], set()),
        ([view("a", 0.1), view("c", 1.0, samples=3)], set()),  # too few samples
        ([view("a", 0.1), view("c", 1.0, healthy=False)], set()),  # unhealthy: not judged
        ([view("a", 0.1, healthy=False), view("c", 1.0)], set()),  # no healthy peer
        ([view("a", None), view("c", 1.0)], set()),
        ([view("c", 1.0)], set()),  # no peers
        ([view("a", 0.1, models="x"), view("c", 1.0, models="y")], set()),  # other models
        ([view("a", 0.1, models="x y"), view("c", 1.0, models="y")], {"c"}),
        ([view("a", 0.1, models=""), view("c", 1.0, models="")], {"c"}),  # unknown lists
        (
            [view("a", 0.1), view("b", 0.12), view("c", 0.11), view("d", 0.5), view("e", 0.2)],
            {"d"},
        ),
    ],
)
def test_slow_candidates(views: list[LatencyView], slow: set[str]) -> None:
    assert slow_candidates(views, factor=3.0, min_samples=10) == slow


def test_slow_detector_gives_a_trial_after_the_hold() -> None:
    clock = Clock()
    settings = OutlierSettings(slow_factor=3.0, slow_min_samples=10, slow_hold_s=30.0)
    det = SlowDetector(settings, clock=clock)
    fast = view("a", 0.1)
    assert det.update([fast, view("c", 1.0, samples=10)]) == {"c"}
    clock.now += 29.0
    assert det.update([fast, view("c", 1.0, samples=10)]) == {"c"} == det.slow
    clock.now += 1.0  # held long enough: a trial, even though its (stale) EWMA is high
    assert det.update([fast, view("c", 1.0, samples=10)]) == set()
    assert det.update([fast, view("c", 1.0, samples=19)]) == set()  # 9 fresh samples
    assert det.update([fast, view("c", 1.0, samples=20)]) == {"c"}  # still slow: marked
    clock.now += 30.0
    assert det.update([fast, view("c", 1.0, samples=20)]) == set()  # a trial again
    assert det.update([fast, view("c", 0.12, samples=25)]) == set()  # recovered
    assert det.update([fast, view("c", 1.0, samples=26)]) == {"c"}  # slow again, judged anew
    assert det.update([fast, view("c", 0.1, samples=40)]) == set()  # recovered: unmarked
    assert det.update([fast]) == set()  # the engine left


# -- through a real gateway -------------------------------------------------------------------
def _chat(client: httpx.Client, url: str, **extra: Any) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **extra}
    return client.post(f"{url}/v1/chat/completions", json=body)


def _engine(client: httpx.Client, gw: str, engine_url: str) -> dict[str, Any]:
    """The engine's entry in the gateway's ``/ready`` detail."""
    ready = client.get(f"{gw}/ready").json()
    (entry,) = [e for e in ready["engines"] if e["url"] == engine_url]
    return dict(entry)


def _chat_until(
    client: httpx.Client,
    gw: str,
    engine_url: str,
    done: Callable[[dict[str, Any]], bool],
    *,
    tries: int = 40,
    pause_s: float = 0.0,
    **extra: Any,
) -> None:
    """Chat through the gateway (every answer a 200) until the engine's ``/ready`` entry
    satisfies ``done``, at most ``tries`` times; the caller asserts the outcome."""
    for _ in range(tries):
        assert _chat(client, gw, **extra).status_code == 200
        if done(_engine(client, gw, engine_url)):
            return
        time.sleep(pause_s)


def _with_odd_engine(
    start_engines: StartEngines,
    start_gateway: StartGateway,
    outliers: dict[str, float],
    **knobs: Any,
) -> tuple[FakeEngine, str, str, str]:
    """Two engines behind a gateway with ``outliers`` settings, the second one's ``knobs``
    set (``status=500``, ``ttft=0.2``): the odd engine, its URL, the other's URL, the
    gateway's URL."""
    (_, normal_srv), (odd, odd_srv) = start_engines(2)
    for knob, value in knobs.items():
        setattr(odd, knob, value)
    gw = start_gateway([normal_srv.url, odd_srv.url], outliers=outliers)
    return odd, odd_srv.url, normal_srv.url, gw.url


def test_failing_engine_is_ejected_then_readmitted_after_it_heals(
    start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    bad, bad_url, _, gw_url = _with_odd_engine(
        start_engines,
        start_gateway,
        {"consecutive_failures": 2, "base_ejection_s": 2.0, "max_ejection_s": 8.0},
        status=500,
    )
    with httpx.Client(timeout=30.0) as client:
        # round-robin: the bad engine fails twice within a few requests; failover hides its 500s
        _chat_until(client, gw_url, bad_url, lambda e: e["outlier"]["state"] == "ejected")
        before = _engine(client, gw_url, bad_url)["outlier"]
        assert before["state"] == "ejected" and before["ejections"] >= 1
        hits = bad.requests
        answers = [_chat(client, gw_url) for _ in range(10)]
        after = _engine(client, gw_url, bad_url)["outlier"]
        if after["ejections"] == before["ejections"] and after["state"] == "ejected":
            assert bad.requests == hits  # the same ejection throughout: no request reached it
        assert [r.status_code for r in answers] == [200] * 10
        metrics = client.get(f"{gw_url}/metrics").text
        assert f'switchyard_endpoint_ejected_ratio{{endpoint="{bad_url[7:]}"}} 1.0' in metrics
        assert f'switchyard_outlier_ejections_total{{endpoint="{bad_url[7:]}"}}' in metrics

        bad.status = None  # healed: the half-open probe succeeds and readmits it
        _chat_until(client, gw_url, bad_url, lambda e: e["outlier"]["state"] == "ok",
                    tries=400, pause_s=0.05)  # fmt: skip
        assert _engine(client, gw_url, bad_url)["outlier"]["state"] == "ok"
        served = bad.requests
        for _ in range(6):
            assert _chat(client, gw_url).status_code == 200
        assert bad.requests > served  # back in the rotation


def test_retry_storm_stays_within_the_budget(
    start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    engines = start_engines(3, status=500)
    n, ratio, floor = 30, 0.1, 1.0
    gw = start_gateway(
        [srv.url for _, srv in engines],
        proxy={"max_attempts": 3},  # without a budget: up to 3 attempts per request
        outliers={"consecutive_failures": 1000, "retry_budget_ratio": ratio,
                  "retry_budget_min_per_s": floor / 10.0, "retry_budget_window_s": 10.0},
    )  # fmt: skip
    with httpx.Client(timeout=30.0) as client, ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda _: _chat(client, gw.url), range(n)))
        metrics = client.get(f"{gw.url}/metrics").text
    attempts = sum(engine.requests for engine, _ in engines)
    assert [r.status_code for r in answers] == [500] * n  # the engine's own error, at once
    assert n <= attempts <= n * (1 + ratio) + floor
    exhausted = [line for line in metrics.splitlines()
                 if line.startswith("switchyard_proxy_refused_retries_total")]  # fmt: skip
    assert float(exhausted[0].split()[-1]) >= n - (attempts - n)


def test_slow_engine_is_avoided_and_shown(
    start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    slow, slow_url, fast_url, gw_url = _with_odd_engine(
        start_engines,
        start_gateway,
        {"slow_min_samples": 3, "slow_check_s": 0.05, "slow_factor": 3.0},
        ttft=0.2,
    )
    with httpx.Client(timeout=30.0) as client:
        # streams measure TTFT; round-robin feeds both engines
        _chat_until(client, gw_url, slow_url, lambda e: bool(e["slow"]), stream=True)
        assert _engine(client, gw_url, slow_url)["slow"]
        assert not _engine(client, gw_url, fast_url)["slow"]
        served = slow.requests
        for _ in range(6):
            assert _chat(client, gw_url, stream=True).status_code == 200
        assert slow.requests == served  # avoided while the fast one serves
        metrics = client.get(f"{gw_url}/metrics").text
    assert f'switchyard_endpoint_slow_ratio{{endpoint="{slow_url[7:]}"}} 1.0' in metrics
    assert f'switchyard_endpoint_slow_ratio{{endpoint="{fast_url[7:]}"}} 0.0' in metrics
