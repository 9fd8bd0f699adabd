"""Admission control: the wait queue as table tests (priority, FIFO, bounds, timeout,
disconnect, shutdown, retry-after), its room checks, and through a real gateway (requests
wait for a busy engine instead of an instant 503; shed with retry-after when they cannot)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from gateway.admission import Admission, Saturated, why_empty
from gateway.endpoints import EndpointRegistry
from gateway.errors import Overloaded, ShuttingDown
from gateway.metrics import GatewayMetrics
from gateway.settings import AdmissionSettings
from gateway.shutdown import InFlight
from routing import RouteRequest, builtin_policies
from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.servers import wait_until
from tests.routing.helpers import ep


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """An admission queue over one room counter: ``attempt`` takes a unit of room or raises
    :class:`Saturated`; ``has_room`` says whether a unit is left."""

    def __init__(self, **settings: Any) -> None:
        base: dict[str, Any] = {"max_per_engine": 1, "queue_size": 16, "queue_timeout_s": 10.0}
        self.endpoints = EndpointRegistry()
        self.metrics = GatewayMetrics.create(self.endpoints)
        self.inflight = InFlight()
        self.clock = Clock()
        self.admission = Admission(
            AdmissionSettings(**{**base, **settings}),
            endpoints=self.endpoints,
            metrics=self.metrics,
            inflight=self.inflight,
            clock=self.clock,
        )
        self.room = 0
        self.admitted: list[str] = []
        self.tries = 0

    def has_room(self) -> bool:
        return self.room > 0

    def attempt(self, name: str) -> Callable[[], Any]:
        async def run() -> str:
            self.tries += 1
            if self.room <= 0:
                raise Saturated("busy")
            self.room -= 1
            self.admitted.append(name)
            return name

        return run

    async def enter(self, name: str, priority: int = 0, **kw: Any) -> asyncio.Task[str]:
        """Start a request and let it reach the queue."""
        task = asyncio.get_running_loop().create_task(
            self.admission.admit(
                self.attempt(name), priority=priority, has_room=self.has_room, **kw
            )
        )
        for _ in range(5):
            await asyncio.sleep(0)
        return task

    async def release(self, n: int = 1) -> None:
        """Free ``n`` units of room, one release each, and let the woken run."""
        for _ in range(n):
            self.room += 1
            self.admission.notify()
            for _ in range(5):
                await asyncio.sleep(0)

    def shed(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "switchyard_admission_shed_requests_total", {"reason": reason}
        )
        return value or 0.0

    def depth(self) -> float | None:
        return self.metrics.registry.get_sample_value("switchyard_admission_queued_requests")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arrivals", "order"),
    [
        ([("a", 0), ("b", 0), ("c", 0)], ["a", "b", "c"]),  # FIFO
        ([("a", 0), ("b", 5), ("c", 1)], ["b", "c", "a"]),  # higher priority first
        ([("a", 1), ("b", 2), ("c", 1), ("d", 2), ("e", -3)], ["b", "d", "a", "c", "e"]),
        ([("a", -1), ("b", -1)], ["a", "b"]),
    ],
)
async def test_priority_then_fifo(arrivals: list[tuple[str, int]], order: list[str]) -> None:
    rig = Rig()
    tasks = [await rig.enter(name, priority) for name, priority in arrivals]
    assert rig.admission.depth == len(arrivals) and rig.depth() == len(arrivals)
    assert rig.admitted == []
    for _ in arrivals:
        await rig.release()
    assert rig.admitted == order
    assert [await t for t in tasks] == [name for name, _ in arrivals]
    assert rig.admission.depth == 0 and rig.depth() == 0
    waited = rig.metrics.registry.get_sample_value("switchyard_admission_wait_seconds_count")
    assert waited == len(arrivals)


@pytest.mark.anyio
async def test_no_wait_while_there_is_room_and_nobody_waits() -> None:
    rig = Rig()
    rig.room = 2
    assert await rig.admission.admit(rig.attempt("a"), has_room=rig.has_room) == "a"
    assert rig.admission.depth == 0 and rig.tries == 1
    # Somebody waits: a newcomer queues behind it, even though there is room for it.
    rig.room = 0
    first = await rig.enter("first")
    rig.room = 1
    late = await rig.enter("late")
    await rig.release(0)
    assert rig.admitted == ["a", "first"]
    await rig.release()
    assert rig.admitted == ["a", "first", "late"]
    assert await first == "first" and await late == "late"


@pytest.mark.anyio
async def test_a_woken_waiter_that_loses_the_race_keeps_its_place() -> None:
    rig = Rig()
    a = await rig.enter("a")
    b = await rig.enter("b")
    rig.room += 1
    rig.admission.notify()  # wakes a...
    rig.room -= 1  # ...but the room is taken before it runs
    for _ in range(5):
        await asyncio.sleep(0)
    assert rig.admitted == [] and rig.admission.depth == 2
    await rig.release()
    assert rig.admitted == ["a"]
    await rig.release()
    assert rig.admitted == ["a", "b"]
    await asyncio.gather(a, b)


@pytest.mark.anyio
@pytest.mark.parametrize("queue_size", [0, 1, 3])
async def test_a_full_queue_sheds_at_once_with_retry_after(queue_size: int) -> None:
    rig = Rig(queue_size=queue_size)
    waiting = [await rig.enter(f"w{i}") for i in range(queue_size)]
    with pytest.raises(Overloaded) as shed:
        await rig.admission.admit(rig.attempt("x"), has_room=rig.has_room)
    assert rig.shed("queue_full") == 1
    headers = shed.value.headers()
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1000
    assert rig.admission.depth == queue_size
    await rig.release(queue_size)
    assert rig.admitted == [f"w{i}" for i in range(queue_size)]
    await asyncio.gather(*waiting)


@pytest.mark.anyio
async def test_timeout_sheds_with_retry_after_and_leaves_the_queue() -> None:
    rig = Rig(queue_timeout_s=0.05)
    with pytest.raises(Overloaded) as shed:
        await rig.admission.admit(rig.attempt("x"), has_room=rig.has_room)
    assert "stayed busy" in shed.value.message
    assert shed.value.headers()["retry-after"] == "1"  # no release seen: at least 1 s
    assert rig.shed("timeout") == 1 and rig.admission.depth == 0


@pytest.mark.anyio
async def test_a_client_that_disconnects_leaves_the_queue() -> None:
    rig = Rig()
    left = asyncio.Event()
    first = await rig.enter("first", gone=left.wait)
    second = await rig.enter("second")
    assert rig.admission.depth == 2
    left.set()
    with pytest.raises(Overloaded):
        await first
    assert rig.admission.depth == 1 and rig.shed("disconnect") == 1
    await rig.release()
    assert rig.admitted == ["second"]
    assert await second == "second"


@pytest.mark.anyio
async def test_shutdown_ends_the_waiters_cleanly() -> None:
    rig = Rig()
    tasks = [await rig.enter(f"w{i}") for i in range(3)]
    assert len(rig.inflight) == 3
    assert rig.inflight.cancel_all() == 3
    for task in tasks:
        with pytest.raises(ShuttingDown):
            await task
    assert rig.admission.depth == 0 and len(rig.inflight) == 0 and rig.shed("shutdown") == 3
    with pytest.raises(ShuttingDown):  # draining: a newcomer that must wait ends at once
        await rig.admission.admit(rig.attempt("late"), has_room=rig.has_room)


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    rig = Rig()
    task = await rig.enter("a")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.admission.depth == 0 and len(rig.inflight) == 0


@pytest.mark.anyio
async def test_waiters_recheck_room_without_a_release() -> None:
    rig = Rig()
    task = await rig.enter("a")
    rig.room = 1  # room made elsewhere (another replica's request ended): no notify
    assert await asyncio.wait_for(task, timeout=10) == "a"


@pytest.mark.parametrize(
    ("gaps", "ahead", "expected"),
    [
        ([], 0, 10.0),  # nothing released yet: the queue timeout
        ([0.5, 0.5, 0.5], 0, 1.0),  # at least 1 s
        ([2.0, 2.0], 0, 2.0),
        ([2.0, 2.0], 4, 10.0),  # (ahead + 1) x the gap
        ([2.0, 2.0], 100, 60.0),  # at most 60 s
    ],
)
def test_retry_after_estimate(gaps: list[float], ahead: int, expected: float) -> None:
    rig = Rig()
    rig.admission.notify()
    for gap in gaps:
        rig.clock.now += gap
        rig.admission.notify()
    assert rig.admission.retry_after(ahead) == pytest.approx(expected)


def test_a_long_silence_lengthens_the_estimate() -> None:
    rig = Rig()
    for _ in range(3):
        rig.admission.notify()
        rig.clock.now += 1.0
    rig.clock.now += 9.0  # 10 s since the last release
    assert rig.admission.retry_after(0) == pytest.approx(10.0)


def test_inactive_without_caps_and_no_release_hook() -> None:
    endpoints = EndpointRegistry()
    admission = Admission(AdmissionSettings(), endpoints=endpoints)
    assert not admission.active and endpoints.pool.on_release is None
    Admission(AdmissionSettings(max_in_flight=4), endpoints=endpoints)
    assert endpoints.pool.on_release is not None


@pytest.mark.parametrize(
    ("engines", "want", "room"),
    [
        ([{"in_flight": 0}], "m", True),
        ([{"in_flight": 1}], "m", False),
        ([{"in_flight": 1}, {"in_flight": 0}], "m", True),
        ([{"in_flight": 0, "healthy": False}], "m", False),
        ([{"in_flight": 0, "models": ("other",)}], "m", False),
        ([{"in_flight": 0, "models": ()}], "m", True),  # unknown list: may serve anything
        ([{"in_flight": 0, "ejected": True}, {"in_flight": 1}], "m", False),
    ],
)
def test_room_for_a_model(engines: list[dict[str, Any]], want: str, room: bool) -> None:
    endpoints = EndpointRegistry()
    admission = Admission(AdmissionSettings(max_per_engine=1), endpoints=endpoints)
    for i, spec in enumerate(engines):
        state = endpoints.add(f"http://e{i}:1", models=spec.get("models", ("m",)))
        state.record_probe(spec.get("healthy", True), fail_threshold=1, success_threshold=1)
        for _ in range(spec["in_flight"]):
            state.lease()
        if spec.get("ejected"):
            state.outlier.phase = state.outlier.phase.EJECTED
            state.outlier.until = float("inf")
            endpoints.outliers.out += 1
    assert admission.room_for(want)() is room
    assert admission.room_for(want) is admission.room_for(want)  # one check per model


@pytest.mark.anyio
async def test_global_cap_counts_leases_and_a_release_wakes_a_waiter() -> None:
    endpoints = EndpointRegistry()
    state = endpoints.add("http://e:1", models=("m",))
    admission = Admission(AdmissionSettings(max_in_flight=1), endpoints=endpoints)
    lease = state.lease()
    assert endpoints.leases == 1 and not admission.room_for("m")()
    calls: list[int] = []

    async def attempt() -> int:
        calls.append(endpoints.leases)
        if endpoints.leases >= 1:
            raise Saturated("full")
        return 7

    task = asyncio.get_running_loop().create_task(admission.admit(attempt))
    for _ in range(5):
        await asyncio.sleep(0)
    assert admission.depth == 1 and calls == []  # no room: it did not even route
    lease.release()
    lease.release()  # twice: counted once
    assert endpoints.leases == 0
    assert await task == 7 and calls == [0]


@pytest.mark.parametrize(
    ("everything", "routable", "roomy", "why"),
    [
        ([ep("a")], [ep("a")], [], "saturated"),
        ([ep("a"), ep("b")], [ep("a")], [], "saturated"),
        ([ep("a")], [], [], "ejected"),
        ([ep("a", healthy=False)], [ep("a", healthy=False)], [], None),
        ([ep("a", models=frozenset({"x"}))], [ep("a", models=frozenset({"x"}))], [], None),
    ],
)
def test_why_empty(everything: Any, routable: Any, roomy: Any, why: str | None) -> None:
    policy = builtin_policies()["least-request"]()
    route = RouteRequest(model="m")
    if routable == everything:
        routable = everything  # the router passes the same list when nothing is ejected
    got = why_empty(policy, route, everything=everything, routable=routable, roomy=roomy)
    assert got == why


# -- through a real gateway -------------------------------------------------------------------
def _chat(client: httpx.Client, url: str, **extra: Any) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **extra}
    return client.post(f"{url}/v1/chat/completions", json=body)


def test_busy_engines_make_requests_wait_then_succeed(
    start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    engines = start_engines(2, ttft=0.3)
    gw = start_gateway(
        [srv.url for _, srv in engines],
        admission={"max_per_engine": 1, "queue_size": 16, "queue_timeout_s": 30.0},
    )
    peak = [0]
    stop = threading.Event()

    def watch() -> None:  # the most requests either engine ever ran at once
        while not stop.is_set():
            peak[0] = max(peak[0], *(engine.running for engine, _ in engines))
            stop.wait(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with httpx.Client(timeout=30.0) as client, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _chat(client, gw.url), range(6)))
        metrics = client.get(f"{gw.url}/metrics").text
    stop.set()
    watcher.join()
    assert [r.status_code for r in answers] == [200] * 6
    assert sum(engine.requests for engine, _ in engines) == 6
    assert peak[0] <= 1  # never two at once on one engine
    assert "switchyard_admission_wait_seconds_count" in metrics
    waited = [line for line in metrics.splitlines()
              if line.startswith("switchyard_admission_wait_seconds_count")]  # fmt: skip
    assert float(waited[0].split()[-1]) >= 1  # six requests, two engines: some waited


@pytest.mark.parametrize(
    "admission",
    [
        {"max_per_engine": 1, "queue_size": 0},
        {"max_per_engine": 1, "queue_timeout_s": 0.05},
        {"max_in_flight": 1, "queue_size": 0},
    ],
)
def test_shed_answers_503_with_retry_after(
    start_engines: StartEngines, start_gateway: StartGateway, admission: dict[str, Any]
) -> None:
    ((engine, srv),) = start_engines(1, ttft=2.0)
    gw = start_gateway([srv.url], admission=admission)
    with httpx.Client(timeout=30.0) as client, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(_chat, client, gw.url)
        assert wait_until(lambda: engine.running == 1)
        shed = _chat(client, gw.url)
        assert busy.result().status_code == 200
    assert shed.status_code == 503
    assert shed.json()["error"]["code"] == "server_is_overloaded"
    assert int(shed.headers["retry-after"]) >= 1
    assert int(shed.headers["retry-after-ms"]) >= 1000
    assert engine.requests == 1


def test_a_client_that_leaves_while_waiting_leaves_the_queue(
    start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    ((engine, srv),) = start_engines(1, ttft=2.0)
    gw = start_gateway([srv.url], admission={"max_per_engine": 1, "queue_timeout_s": 30.0})
    left = 'switchyard_admission_shed_requests_total{reason="disconnect"} 1.0'
    with httpx.Client(timeout=30.0) as client, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(_chat, client, gw.url)
        assert wait_until(lambda: engine.running == 1)
        with httpx.Client(timeout=0.2) as impatient, pytest.raises(httpx.ReadTimeout):
            _chat(impatient, gw.url)  # waits in the queue, then hangs up
        assert wait_until(lambda: left in client.get(f"{gw.url}/metrics").text)
        assert busy.result().status_code == 200
        metrics = client.get(f"{gw.url}/metrics").text
    assert "switchyard_admission_queued_requests 0.0" in metrics
    assert engine.requests == 1  # the one that left never reached the engine
