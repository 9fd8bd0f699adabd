"""The clock-owning loop of one simulated engine.

Simulated time runs at ``speed`` x wall time: ``sim = anchor_sim + (monotonic() - anchor_wall)
* speed``. While the core has work the driver calls ``core.step(start)``, sleeps until the wall
instant that maps to ``start + duration`` (duration times the fault slowdown), then delivers each
request's outputs, stamped ``start + duration``, to that request's bounded queue and records the
vLLM request metrics in simulated seconds. Idle, it waits on an event set by
:meth:`EngineDriver.submit`. KV events taken from the core after each step go to ``on_events``.

Back-to-back steps are exact in simulated time: step k+1 starts where step k ended, and a late
wake-up (event-loop jitter, other engines' work) is caught up by sleeping less on the next
steps. When the host falls more than ``MAX_LAG_S`` wall seconds behind, the clock is re-anchored
(simulated time pauses for the excess): the run gets slower than ``speed`` but step times, TTFT
and ITL stay what the model says instead of absorbing host overhead x ``speed``.

Queue and prefill times follow vLLM's ``RequestStateStats``: the core reports the ids it
scheduled for the first time in each step (``StepResult.first_scheduled_ids``); that step's start
is the request's ``scheduled`` time. Queue time = scheduled - arrival, prefill time = first token
- scheduled, inference time = finish - scheduled (a preemption does not reset it, as in vLLM).

Per-parent metrics (``vllm:request_params_n``, ``vllm:request_max_num_generation_tokens``): the
n choices of one prompt share a :class:`ParentGroup` (vLLM's ``ParentRequest``); both histograms
are observed once, when its last submitted child finishes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from enginesim.core.api import EngineCoreAPI, FinishReason, KVEvent, SimRequest, StepResult
from enginesim.server.metrics import EngineMetrics

__all__ = ["Delivery", "EngineDriver", "ParentGroup"]

log = logging.getLogger(__name__)

MAX_LAG_S = 0.02


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one step produced for one request, visible at simulated time ``time``."""

    token_ids: tuple[int, ...]
    finished: FinishReason | None
    num_cached_tokens: int | None
    time: float
    error: str | None = None


@dataclass(slots=True)
class ParentGroup:
    """The ``n`` choices of one prompt (vLLM's ``ParentRequest``); held only by its tracks."""

    n: int
    pending: int = 0
    max_generation_tokens: int = 0


@dataclass(slots=True)
class _Track:
    arrival: float
    prompt_len: int
    max_tokens: int
    queue: asyncio.Queue[Delivery]
    parent: ParentGroup | None = None
    scheduled: float | None = None
    first_time: float | None = None
    last_time: float | None = None
    num_tokens: int = 0


class EngineDriver:
    """Runs one core in simulated time; ``submit``/``finish`` are called by the HTTP layer.

    >>> drv = EngineDriver(core, speed=10.0, metrics=m); tg.start_soon(drv.run)
    >>> q = drv.submit(req)  # then: delivery = await q.get()
    """

    def __init__(
        self,
        core: EngineCoreAPI,
        *,
        speed: float,
        metrics: EngineMetrics,
        slowdown: Callable[[], float] = lambda: 1.0,
        on_events: Callable[[Sequence[KVEvent]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_tier_writes: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.core = core
        self.speed = speed
        self._metrics = metrics
        self._lora_enabled = core.stats().max_loras > 0  # vLLM's --enable-lora
        self._slowdown = slowdown
        self._on_events = on_events
        self._on_tier_writes = on_tier_writes
        self._clock = clock
        self._anchor_wall = clock()
        self._anchor_sim = 0.0
        self._cursor = 0.0
        self._horizon = math.inf  # end of the step in flight: nothing is stamped later than it
        self._tracks: dict[str, _Track] = {}
        self._wake = asyncio.Event()
        self.dead_reason: str | None = None

    def now(self) -> float:
        """Current simulated time (never past the end of the step in flight)."""
        mapped = self._anchor_sim + (self._clock() - self._anchor_wall) * self.speed
        return min(mapped, self._horizon)

    def _wall_at(self, sim: float) -> float:
        return self._anchor_wall + (sim - self._anchor_sim) / self.speed

    @property
    def num_inflight(self) -> int:
        return len(self._tracks)

    def submit(
        self, req: SimRequest, *, parent: ParentGroup | None = None
    ) -> asyncio.Queue[Delivery]:
        """Add ``req`` to the core; outputs arrive on the returned queue (max_tokens + 2 slots).

        ``parent``: the group of the n choices ``req`` belongs to (None: a lone request, n = 1).
        """
        if self.dead_reason is not None:
            raise RuntimeError(self.dead_reason)
        queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=req.max_tokens + 2)
        self.core.add_request(req)
        if parent is not None:
            parent.pending += 1
        self._tracks[req.request_id] = _Track(
            req.arrival_time, len(req.prompt_token_ids), req.max_tokens, queue, parent
        )
        self._wake.set()
        return queue

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """End a request from the server side (stop string, disconnect): abort it in the core."""
        track = self._tracks.pop(request_id, None)
        if track is None:
            return
        self._abort(request_id)
        self._record_finish(track, reason, self.now())
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        """Abort in the core; like vLLM, ``lora_requests_info`` drops the request's adapter
        at once (no step may follow: the last request of an adapter leaving)."""
        self.core.abort_request(request_id)
        if self._lora_enabled:
            self._metrics.record_lora(self.core.stats())

    def reset_prefix_cache(self) -> bool:
        """vLLM ``/reset_prefix_cache`` when the core supports it; publishes its events now."""
        reset = getattr(self.core, "reset_prefix_cache", None)
        if reset is None:
            return False
        done = bool(reset())
        events = self.core.take_events()
        if events and self._on_events is not None:
            self._on_events(events)
        return done

    async def run(self) -> None:
        """The engine loop; runs until cancelled."""
        busy = False
        while True:
            if not self.core.has_work():
                busy = False
                self._horizon = math.inf
                self._wake.clear()
                await self._wake.wait()
                continue
            start = self._step_start(busy)
            try:
                res = self.core.step(start)
                events = self.core.take_events()
            except Exception as exc:  # a core bug must not hang every client forever
                log.exception("engine core step failed; engine is now dead")
                self._die(f"engine core failed: {exc!r}", start)
                return
            if events and self._on_events is not None:
                self._on_events(events)
            if self._on_tier_writes is not None:
                writes = self.core.take_tier_writes()
                if writes:
                    self._on_tier_writes(writes)
            end = start + max(0.0, res.duration_s) * max(1.0, self._slowdown())
            self._horizon = end
            await asyncio.sleep(max(0.0, self._wall_at(end) - self._clock()))
            self._cursor = end
            busy = True
            self._deliver(res, start=start, end=end)
            if self._lora_enabled:
                self._metrics.record_lora(self.core.stats())

    def _step_start(self, busy: bool) -> float:
        """Back-to-back after a step (catching up small lags), else the current time."""
        if not busy:
            return max(self._cursor, self.now())
        lag = self._clock() - self._wall_at(self._cursor)
        if lag > MAX_LAG_S:  # too far behind to catch up: pause simulated time instead
            self._anchor_wall, self._anchor_sim = self._clock(), self._cursor
        return self._cursor

    def _deliver(self, res: StepResult, *, start: float, end: float) -> None:
        m = self._metrics
        for rid in res.first_scheduled_ids:
            scheduled = self._tracks.get(rid)
            if scheduled is not None and scheduled.scheduled is None:
                scheduled.scheduled = max(scheduled.arrival, start)
        iteration_tokens = 0
        for out in res.outputs:
            track = self._tracks.get(out.request_id)
            if track is None:  # aborted while the step ran
                continue
            iteration_tokens += len(out.new_token_ids)
            if out.new_token_ids:
                if track.first_time is None:
                    # vLLM: the prompt tokens computed (not cached) count towards the step.
                    cached = out.num_cached_tokens or 0
                    iteration_tokens += track.prompt_len - cached
                    track.first_time = end
                    if track.scheduled is None:  # a core without first_scheduled_ids
                        track.scheduled = max(track.arrival, start)
                    m.observe_first_token(
                        ttft=end - track.arrival,
                        queue_s=max(0.0, track.scheduled - track.arrival),
                        prefill_s=end - track.scheduled,
                        cached=cached,
                        external=out.num_external_cached_tokens or 0,
                        prompt_tokens=track.prompt_len,
                    )
                elif track.last_time is not None:
                    m.observe_itl(end - track.last_time)
                track.last_time = end
                track.num_tokens += len(out.new_token_ids)
            delivery = Delivery(out.new_token_ids, out.finished, out.num_cached_tokens, end)
            if out.finished is not None:
                self._tracks.pop(out.request_id, None)
                self._record_finish(track, out.finished, end)
            self._put(out.request_id, track, delivery)
        if iteration_tokens:  # vLLM: computed prompt tokens of first-token requests + new ones
            m.observe_iteration(iteration_tokens)

    def _put(self, request_id: str, track: _Track, delivery: Delivery) -> None:
        try:
            track.queue.put_nowait(delivery)
        except asyncio.QueueFull:  # consumer far behind: never block the engine loop
            log.warning("dropping request %s: output queue full", request_id)
            if self._tracks.pop(request_id, None) is not None:
                self._abort(request_id)

    def _record_finish(self, track: _Track, reason: FinishReason, end: float) -> None:
        first = track.first_time if track.first_time is not None else end
        last = track.last_time if track.last_time is not None else end
        tpot = (last - first) / (track.num_tokens - 1) if track.num_tokens > 1 else None
        self._metrics.observe_finished(
            reason=reason,
            e2e=end - track.arrival,
            inference_s=max(0.0, end - (track.scheduled or track.arrival)),
            decode_s=max(0.0, last - first),
            tpot=tpot,
            prompt_tokens=track.prompt_len,
            generation_tokens=track.num_tokens,
            max_tokens_param=track.max_tokens,
        )
        parent = track.parent
        if parent is None:
            self._metrics.observe_parent(n=1, max_generation_tokens=track.num_tokens)
            return
        parent.pending -= 1
        parent.max_generation_tokens = max(parent.max_generation_tokens, track.num_tokens)
        if parent.pending == 0:
            self._metrics.observe_parent(
                n=parent.n, max_generation_tokens=parent.max_generation_tokens
            )

    def _die(self, reason: str, now: float) -> None:
        self.dead_reason = reason
        for rid, track in list(self._tracks.items()):
            self._tracks.pop(rid, None)
            try:
                track.queue.put_nowait(Delivery((), "abort", None, now, error=reason))
            except asyncio.QueueFull:
                pass
