"""The decision loop: every ``interval_s`` observe, decide, clamp, and patch if leader.

One tick (:meth:`Controller.tick`):

1. **observe**: ``await source.observe()`` (an :class:`ObservationSource`: the standalone
   pod scraper of :mod:`autoscale.sources`, the gateway's own counters in
   ``gateway/autoscaling.py``, a benchmark's). An :class:`ObservationError` (or any
   :class:`autoscale.kube.KubeError`) or an observation marked ``stale`` makes the tick
   **hold**: no patch, ``switchyard_autoscaler_holding_ratio`` 1, ``errors_total{kind}`` counted,
   and the next tick comes after a backoff (``interval_s`` x 2, 4, ... up to
   ``max_backoff_s``); the first good tick resets it. The policy still sees a stale
   observation (its windows follow time; the protocol says it must hold on it), but its
   answer is replaced by a hold whatever it says;
2. **decide**: ``policy.decide(obs)``; a policy that raises is a bug, counted
   (``kind="policy"``) and held on;
3. **clamp**: the :class:`autoscale.actuator.Actuator`'s limits;
4. **patch**, only when leader (no elector: always) and the plan differs from
   ``spec.replicas``; the patch's timeout is cut to the leader's safe window, so a patch never
   lands after a peer may have taken the lease over. A failed patch holds like an API error.

Every tick is logged as one ``key=value`` line (INFO when something changed, else DEBUG)
and exported (:class:`autoscale.metrics.AutoscalerMetrics`). Time is the injected
:class:`autoscale.clock.Clock`'s: ``Observation.now``, cooldowns, the interval.

Example::

    controller = Controller(source=source, policy=build("kpa", {}), actuator=actuator,
                            metrics=AutoscalerMetrics(registry, policy="kpa"), elector=elector)
    await controller.run()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import anyio

from autoscale.actuator import Actuator, Plan
from autoscale.clock import Clock, WallClock
from autoscale.kube import KubeError
from autoscale.metrics import AutoscalerMetrics
from autoscale.signals import Decision, Observation, Policy

__all__ = ["Controller", "Elector", "ObservationError", "ObservationSource", "Tick"]

log = logging.getLogger(__name__)

MIN_PATCH_WINDOW_S = 0.05
"""A leader with less of its safe window left than this does not start a patch."""


class ObservationError(Exception):
    """A source could not observe; ``kind`` is ``api`` or ``metrics`` (a metric label)."""

    def __init__(self, message: str, *, kind: str = "api") -> None:
        super().__init__(message)
        self.kind = kind


class ObservationSource(Protocol):
    """Where observations come from; raises :class:`ObservationError` when it cannot."""

    async def observe(self) -> Observation: ...


class Elector(Protocol):
    """Leadership as the loop needs it (:class:`autoscale.leader.LeaderElector`)."""

    def is_leader(self) -> bool: ...

    def safe_window_s(self) -> float: ...

    async def run(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Tick:
    """What one tick did: the decision (with the reason exported), the plan, the outcome."""

    decision: Decision
    plan: Plan | None
    observation: Observation | None
    leader: bool
    patched: bool = False
    error: str | None = None  # the error kind when the tick held on an error

    @property
    def held(self) -> bool:
        return self.error is not None or (self.observation is not None and self.observation.stale)


class Controller:
    """The 1 s loop; see the module docstring."""

    def __init__(
        self,
        *,
        source: ObservationSource,
        policy: Policy,
        actuator: Actuator,
        metrics: AutoscalerMetrics,
        elector: Elector | None = None,
        clock: Clock | None = None,
        interval_s: float = 1.0,
        max_backoff_s: float = 10.0,
        patch_timeout_s: float = 5.0,
        target: str = "",
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.source = source
        self.policy = policy
        self.actuator = actuator
        self.metrics = metrics
        self.elector = elector
        self.clock = clock or WallClock()
        self.interval_s = interval_s
        self.max_backoff_s = max(interval_s, max_backoff_s)
        self.patch_timeout_s = patch_timeout_s
        self.target = target
        self.failures = 0  # ticks held in a row
        self._last_line: tuple[object, ...] | None = None
        metrics.leader.set(0 if elector is not None else 1)

    async def run(self) -> None:
        """Tick forever (and run the elector beside it, if any)."""
        async with anyio.create_task_group() as tg:
            if self.elector is not None:
                tg.start_soon(self.elector.run)
            while True:
                started = self.clock.now()
                await self.tick()
                wait = self.next_delay() - (self.clock.now() - started)
                await self.clock.sleep(max(0.0, wait))

    def next_delay(self) -> float:
        """``interval_s``, or the backoff after held ticks (x 2 per tick, capped)."""
        if self.failures == 0:
            return self.interval_s
        return min(self.max_backoff_s, self.interval_s * 2.0 ** min(self.failures, 16))

    async def tick(self) -> Tick:
        """One observe-decide-clamp-patch round; never raises (but cancellation)."""
        leader = self._leader()
        try:
            obs = await self.source.observe()
        except ObservationError as exc:
            return self._hold(None, exc.kind, f"error_{exc.kind}", str(exc), leader)
        except KubeError as exc:
            return self._hold(None, "api", "error_api", str(exc), leader)
        self.metrics.observed(obs)
        try:
            decision = self.policy.decide(obs)
        except Exception:  # a policy bug must not stop the loop; hold and say so
            log.exception("autoscaler policy %s failed; holding", self.policy.name)
            return self._hold(obs, "policy", "error_policy", "the policy raised", leader)
        if obs.stale:
            return self._hold(obs, "metrics", "stale", "stale metrics", leader, decision)
        plan = self.actuator.plan(decision.desired, current=obs.current, now=obs.now)
        patched = False
        leader = self._leader()
        if leader and plan.replicas != obs.current:
            window = self.elector.safe_window_s() if self.elector is not None else None
            if window is not None and window < MIN_PATCH_WINDOW_S:
                leader = False
            else:
                timeout = (
                    self.patch_timeout_s if window is None else min(window, self.patch_timeout_s)
                )
                try:
                    patched = await self.actuator.apply(
                        plan, current=obs.current, now=obs.now, timeout_s=timeout
                    )
                except KubeError as exc:
                    return self._hold(
                        obs, "api", "error_api", f"patch failed: {exc}", leader, decision
                    )
        if patched:
            self.metrics.patches.inc()
        self.failures = 0
        self.metrics.holding.set(0)
        tick = Tick(decision, plan, obs, leader, patched=patched)
        self._export(tick)
        return tick

    def _leader(self) -> bool:
        leading = self.elector is None or self.elector.is_leader()
        self.metrics.leader.set(1 if leading else 0)
        return leading

    def _hold(
        self,
        obs: Observation | None,
        kind: str,
        reason: str,
        message: str,
        leader: bool,
        decision: Decision | None = None,
    ) -> Tick:
        """No patch this tick: count the error, back off, export a hold with ``reason``."""
        self.failures += 1
        self.metrics.error(kind)
        self.metrics.holding.set(1)
        current = obs.current if obs is not None else 0
        held = Decision(current, reason, panic=decision.panic if decision else False)
        log.warning(
            "autoscaler hold target=%s reason=%s error=%r retry_in=%.1fs",
            self.target, reason, message[:200], self.next_delay(),
        )  # fmt: skip
        tick = Tick(held, None, obs, leader, error=kind)
        self._export(tick)
        return tick

    def _export(self, tick: Tick) -> None:
        m, d, obs, plan = self.metrics, tick.decision, tick.observation, tick.plan
        m.decided(reason=d.reason)
        m.panic.set(1 if d.panic else 0)
        if plan is not None:
            m.recommended.set(plan.desired)
            m.desired.set(plan.replicas)
            if plan.limit is not None:
                m.limited.labels(limit=plan.limit).inc()
        current = obs.current if obs is not None else None
        ready = obs.ready if obs is not None else None
        line = (d.reason, d.panic, plan, current, ready, tick.leader, tick.patched)
        level = logging.INFO if line != self._last_line or tick.patched else logging.DEBUG
        self._last_line = line
        log.log(
            level,
            "autoscaler decision target=%s policy=%s reason=%s panic=%s desired=%s "
            "replicas=%s limit=%s current=%s ready=%s leader=%s patched=%s",
            self.target, self.policy.name, d.reason, d.panic,
            plan.desired if plan else d.desired, plan.replicas if plan else current,
            plan.limit if plan else None, current, ready, tick.leader, tick.patched,
        )  # fmt: skip
