"""Admission control: concurrency caps with a bounded priority wait queue, not an instant 503.

Two caps (``settings.admission``), both off by default, and then admission costs nothing
(the proxied route calls the router directly):

* ``max_per_engine`` -- requests in flight on one engine (``EndpointSnapshot.in_flight``,
  which includes other replicas' counts when they share routing state). The router drops
  engines at the cap before the policy chooses; when that leaves no engine for the model it
  raises :class:`Saturated` (:func:`why_empty` tells it from a real outage);
* ``max_in_flight`` -- attempts this process has in flight (leases alive), checked by the
  router too, so both caps are exact on one event loop (routing and the lease that follows
  it run without a suspension between them).

A request that finds no room waits in one queue: higher ``priority`` first (its key's or
tenant's), FIFO within a priority, at most ``queue_size`` waiting, each at most
``queue_timeout_s``. When a lease is released anywhere (the registry's ``on_release`` hook
calls :meth:`Admission.notify`), the first waiter in that order whose own check says there
is room for it (an engine serving its model under the cap, the global cap) is woken and
routes again; if it loses the race it keeps its place. Waiters also re-check every
:data:`RECHECK_S`: room may appear with no local release (another replica's request ended,
an engine came back). New arrivals route at once only while nobody waits, so they cannot
overtake the queue.

Shedding answers 503 ``server_is_overloaded`` with ``retry-after`` and ``retry-after-ms``
(queue full, or waited ``queue_timeout_s``): an estimate of when a place frees for it,
(requests ahead + 1) x the recent gap between releases, within 1 to 60 s (the queue timeout
before any release was seen). A waiting client that disconnects leaves the queue; at
shutdown (:meth:`gateway.shutdown.InFlight.cancel_all`) waiters get 503 ``shutting_down``.

Example::

    admission = Admission(settings.admission, endpoints=registry, metrics=metrics)
    if admission.active:
        routed = await admission.admit(route, priority=principal.priority,
                                       has_room=admission.room_for(model),
                                       gone=disconnected(receive))
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from starlette.types import Receive

from gateway.endpoints import EndpointRegistry
from gateway.errors import Overloaded, ShuttingDown
from gateway.metrics import GatewayMetrics
from gateway.settings import AdmissionSettings
from gateway.shutdown import InFlight
from routing import EndpointSnapshot, NoEndpointError, Policy, RouteRequest

__all__ = ["RECHECK_S", "Admission", "Saturated", "disconnected", "why_empty"]

T = TypeVar("T")

RECHECK_S = 0.25
"""A waiter re-checks for room this often even without a local release (bounded staleness
of room made elsewhere: other replicas' counts, engines turning healthy or added)."""
MAX_RETRY_AFTER_S = 60.0
_GAP_ALPHA = 0.2  # EWMA weight of a new gap between releases
_ROOM_CHECKS = 1024  # room checks kept, one per model asked for (cleared when full)


class Saturated(Exception):
    """Every engine that could serve the request is at its cap, or the process is at
    ``max_in_flight``: wait for room and route again (raised by the router)."""


@dataclass(slots=True, eq=False)
class _Waiter:
    priority: int
    has_room: Callable[[], bool]
    future: asyncio.Future[None]
    woken: bool = False
    ended: str | None = None  # "shutdown" | "disconnect"


class Admission:
    """The caps' wait queue (see the module docstring). One per app, on one event loop."""

    def __init__(
        self,
        settings: AdmissionSettings,
        *,
        endpoints: EndpointRegistry,
        metrics: GatewayMetrics | None = None,
        inflight: InFlight | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.metrics = metrics
        self.inflight = inflight
        self._clock = clock
        self.active = settings.max_per_engine is not None or settings.max_in_flight is not None
        self.depth = 0  # waiters in the queue
        self._woken = 0  # of which woken and routing again
        self._queues: dict[int, deque[_Waiter]] = {}
        self._order: list[int] = []  # negated priorities with waiters, ascending
        self._rooms: dict[str, Callable[[], bool]] = {}
        self._last_release: float | None = None
        self._gap: float | None = None  # EWMA of the time between releases
        self._timer: asyncio.TimerHandle | None = None  # the queue's periodic re-check
        if self.active:
            endpoints.pool.on_release = self.notify

    # -- the request path -------------------------------------------------------------------
    async def admit(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        priority: int = 0,
        has_room: Callable[[], bool] | None = None,
        gone: Callable[[], Awaitable[object]] | None = None,
    ) -> T:
        """``attempt()`` (routing) at once when nobody waits and there is room; else, or
        when it raises :class:`Saturated`, wait in the queue and try again when
        ``has_room()`` says so. Raises :class:`Overloaded` when shed (``gone`` returning:
        the client left)."""
        if not self.depth and self._global_room():
            try:
                return await attempt()
            except Saturated:
                pass
        return await self._queued(attempt, priority, has_room or self._global_room, gone)

    def room_for(self, want: str) -> Callable[[], bool]:
        """A waiter's room check for model (or adapter) ``want``: the global cap, and an
        engine that is healthy, routable, serves it and is under ``max_per_engine``."""
        room = self._rooms.get(want)
        if room is None:
            if len(self._rooms) >= _ROOM_CHECKS:
                self._rooms.clear()
            room = self._rooms[want] = partial(self._engine_room, want)
        return room

    def notify(self) -> None:
        """A lease was released somewhere: wake the first waiter with room."""
        now = self._clock()
        if self._last_release is not None:
            gap = now - self._last_release
            self._gap = gap if self._gap is None else self._gap + _GAP_ALPHA * (gap - self._gap)
        self._last_release = now
        if self.depth > self._woken:
            self._dispatch()

    def retry_after(self, ahead: int) -> float:
        """Seconds until a place likely frees for a request with ``ahead`` waiters before
        it (the module docstring says how)."""
        if self._gap is None or self._last_release is None:
            estimate = self.settings.queue_timeout_s
        else:
            gap = max(self._gap, self._clock() - self._last_release)
            estimate = (ahead + 1) * gap
        return min(max(estimate, 1.0), MAX_RETRY_AFTER_S)

    # -- the queue ------------------------------------------------------------------------
    async def _queued(
        self,
        attempt: Callable[[], Awaitable[T]],
        priority: int,
        has_room: Callable[[], bool],
        gone: Callable[[], Awaitable[object]] | None,
    ) -> T:
        settings = self.settings
        if self.depth >= settings.queue_size:
            raise self._shed("queue_full", ahead=self.depth)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, has_room, loop.create_future())
        self._push(waiter)
        started = loop.time()
        deadline = started + settings.queue_timeout_s
        watch = loop.create_task(self._watch(waiter, gone)) if gone is not None else None
        inflight = self.inflight
        token = None
        if inflight is not None:  # (an empty InFlight is falsy)
            token = inflight.add(partial(self._end, waiter, "shutdown"))
        admitted = False
        try:
            self._dispatch()
            while True:
                await self._wait(waiter, deadline)
                try:
                    result = await attempt()
                except Saturated:  # lost the race for the room: same place in line
                    self._sleep(waiter)
                    self._dispatch(skip=waiter)
                    continue
                admitted = True
                return result
        finally:
            if watch is not None:
                watch.cancel()
            if inflight is not None and token is not None:
                inflight.discard(token)
            woken = waiter.woken
            self._pop(waiter)
            if self.metrics is not None:
                self.metrics.admission_wait.observe(loop.time() - started)
            if woken and not admitted:
                self._dispatch()  # it was woken for room it did not take: pass it on

    async def _wait(self, waiter: _Waiter, deadline: float) -> None:
        """Until woken; raises when shed (timeout, shutdown, the client left)."""
        loop = asyncio.get_running_loop()
        while True:
            if waiter.ended == "shutdown":
                self._count_shed("shutdown")
                after = self.retry_after(0)
                raise ShuttingDown("the gateway is shutting down; retry later", retry_after_s=after)
            if waiter.ended == "disconnect":
                raise self._shed("disconnect", ahead=0)
            if waiter.woken:
                return
            now = loop.time()
            if now >= deadline:
                raise self._shed("timeout", ahead=self._ahead(waiter))
            await asyncio.wait((waiter.future,), timeout=deadline - now)

    async def _watch(self, waiter: _Waiter, gone: Callable[[], Awaitable[object]]) -> None:
        with contextlib.suppress(Exception):  # a server whose receive() fails: stop watching
            await gone()
            self._end(waiter, "disconnect")

    def _end(self, waiter: _Waiter, why: str) -> None:
        if waiter.ended is None:
            waiter.ended = why
        if not waiter.future.done():
            waiter.future.set_result(None)

    def _dispatch(self, skip: _Waiter | None = None) -> None:
        """Wake the first waiter, in priority then arrival order, that has room."""
        if self.depth <= self._woken or not self._global_room():
            return
        checked: dict[Callable[[], bool], bool] = {}  # one check per model per pass
        for key in self._order:
            for waiter in self._queues[key]:
                if waiter.woken or waiter is skip or waiter.ended is not None:
                    continue
                room = checked.get(waiter.has_room)
                if room is None:
                    room = checked[waiter.has_room] = waiter.has_room()
                if room:
                    waiter.woken = True
                    self._woken += 1
                    if not waiter.future.done():
                        waiter.future.set_result(None)
                    return

    def _recheck(self) -> None:
        """Every :data:`RECHECK_S` while anybody waits: room may have appeared with no local
        release. One timer for the whole queue, not one per waiter."""
        self._timer = None
        self._dispatch()
        if self.depth:
            self._timer = asyncio.get_running_loop().call_later(RECHECK_S, self._recheck)

    def _sleep(self, waiter: _Waiter) -> None:
        waiter.woken = False
        self._woken -= 1
        waiter.future = asyncio.get_running_loop().create_future()

    def _push(self, waiter: _Waiter) -> None:
        key = -waiter.priority
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            bisect.insort(self._order, key)
        queue.append(waiter)
        self.depth += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RECHECK_S, self._recheck)
        if self.metrics is not None:
            self.metrics.admission_queued.set(self.depth)

    def _pop(self, waiter: _Waiter) -> None:
        key = -waiter.priority
        queue = self._queues[key]
        queue.remove(waiter)
        if not queue:
            del self._queues[key]
            self._order.remove(key)
        if waiter.woken:
            waiter.woken = False
            self._woken -= 1
        self.depth -= 1
        if not self.depth and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.metrics is not None:
            self.metrics.admission_queued.set(self.depth)

    def _ahead(self, waiter: _Waiter) -> int:
        """Waiters before ``waiter`` in line."""
        ahead = 0
        for key in self._order:
            queue = self._queues[key]
            if key == -waiter.priority:
                return ahead + queue.index(waiter)
            ahead += len(queue)
        return ahead

    def _global_room(self) -> bool:
        cap = self.settings.max_in_flight
        return cap is None or self.endpoints.pool.leases + self._woken < cap

    def _engine_room(self, want: str) -> bool:
        if not self._global_room():
            return False
        cap = self.settings.max_per_engine
        if cap is None:
            return True
        for state in self.endpoints:
            snap = state.snapshot()
            if not snap.healthy or (snap.models and want not in snap.models):
                continue
            if snap.in_flight < cap and state.routable():
                return True
        return False

    def _count_shed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.admission_shed.labels(reason=reason).inc()

    def _shed(self, reason: str, *, ahead: int) -> Overloaded:
        self._count_shed(reason)
        messages = {
            "queue_full": "every engine is busy and the wait queue is full; retry later",
            "timeout": "every engine stayed busy for "
            f"{self.settings.queue_timeout_s:g}s; retry later",
            "disconnect": "the client left while waiting for an engine",
        }
        return Overloaded(messages[reason], retry_after_s=self.retry_after(ahead))


def why_empty(
    policy: Policy,
    route: RouteRequest,
    *,
    everything: Sequence[EndpointSnapshot],
    routable: Sequence[EndpointSnapshot],
    roomy: Sequence[EndpointSnapshot],
) -> str | None:
    """The policy found no engine in ``roomy`` (``routable`` without the engines at their
    cap; ``routable``: ``everything`` without the ejected ones). ``"saturated"`` when it
    would have chosen one with room to spare, ``"ejected"`` when only with the ejected
    engines back, None when not even then (a real outage). Runs only on that failure."""
    for reason, candidates, smaller in (
        ("saturated", routable, roomy),
        ("ejected", everything, routable),
    ):
        if candidates is not smaller:
            with contextlib.suppress(NoEndpointError):
                policy.choose(route, candidates)
                return reason
    return None


def disconnected(receive: Receive) -> Callable[[], Awaitable[None]]:
    """``gone`` for :meth:`Admission.admit`: returns when the client disconnects (the request
    body was read whole, so the next ASGI message is the disconnect)."""

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return gone
