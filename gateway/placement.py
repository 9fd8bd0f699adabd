"""The LoRA placement controller: a supervised loop that keeps adapters where demand is.

Every ``lora.placement_interval_s``: (1) reconcile the book with what engines list
(:meth:`gateway.lora_actuator.LoraBook.reconcile`: restarts, adapters loaded or unloaded by
hand); (2) fold the requests seen since the last tick into each registered adapter's
request-rate EWMA (:class:`DemandTracker`) and build :class:`routing.lora.AdapterDemand`
(rate, prompt tokens and requests waiting for an on-demand load, last use);
(3) :func:`routing.lora.plan` over the engines' :class:`routing.lora.EngineSlots` (with
the adapters whose loads back off on each, :class:`gateway.lora_actuator.LoadBackoff`:
never loaded there, no room made there for them; an adapter backing off everywhere is
counted in ``switchyard_lora_suppressed_operations_total{reason="demand"}``); (4) run
its actions (:class:`gateway.lora_actuator.LoraActuator`): per engine in order (an unload
that makes room before the load that needs it), engines in parallel, each call bounded and
at most ``lora.max_concurrent_ops`` at once; outcomes are logged and counted, and a failed
action is planned again once its backoff passes if it is still wanted. An unload whose
adapter got a request after the plan was made is dropped (with the load it made room for):
the engines' loads before it can take seconds, and that request may be running there.

The hot path pays one dict increment per LoRA request (:meth:`DemandTracker.arrived`);
requests for base models pay nothing.

Example::

    controller = PlacementController(endpoints=registry, adapters=adapters, actuator=actuator,
                                     loader=loader, demand=tracker, settings=settings.lora,
                                     placement=placement, metrics=lora_metrics)
    await controller.step()
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence

import anyio

from gateway.adapters import AdapterRegistry
from gateway.endpoints import EndpointRegistry
from gateway.errors import GatewayError
from gateway.lora_actuator import LoraActuator
from gateway.lora_loader import OnDemandLoader
from gateway.lora_metrics import LoraMetrics
from gateway.settings import LoraSettings
from routing.lora import AdapterDemand, PlacementAction, PlacementSettings, plan, suppressed

__all__ = ["DemandTracker", "PlacementController"]

log = logging.getLogger(__name__)

RECONCILE_S = 2.0
"""How often the book follows the engines when the controller is off."""


class DemandTracker:
    """Requests per adapter since the last tick, their rate EWMA and each one's last use.

    ``alpha`` weighs one tick's rate. Only adapters the registry knows are kept at a tick
    (the counts between two ticks are bounded by the adapters requested, all of which an
    engine or the registry lists); every reconcile (also with the controller off) drops
    adapters neither registered nor listed (:meth:`prune`).
    Example: ``tracker.arrived("sql", now=12.5)``."""

    def __init__(self, *, alpha: float) -> None:
        self.alpha = alpha
        self._counts: dict[str, int] = {}
        self.rates: dict[str, float] = {}
        self.last_used: dict[str, float] = {}
        self._last_tick: float | None = None

    def arrived(self, adapter: str, *, now: float) -> None:
        self._counts[adapter] = self._counts.get(adapter, 0) + 1
        self.last_used[adapter] = now

    def tick(self, now: float, known: AdapterRegistry) -> None:
        """Fold the counts since the last tick into the rates (the first tick only starts
        the window)."""
        counts, self._counts = self._counts, {}
        last, self._last_tick = self._last_tick, now
        if last is None or now <= last:
            return
        elapsed = now - last
        for spec in known:
            rate = counts.get(spec.name, 0) / elapsed
            old = self.rates.get(spec.name)
            self.rates[spec.name] = rate if old is None else old + self.alpha * (rate - old)
        for table in (self.rates, self.last_used):
            for gone in [n for n in table if n not in known]:
                del table[gone]

    def prune(self, keep: Collection[str]) -> None:
        """Forget the adapters not in ``keep`` (neither registered nor listed by an engine):
        with the controller off nothing ticks, and these tables grew with every adapter
        name ever requested."""
        for table in (self._counts, self.rates, self.last_used):
            for gone in [n for n in table if n not in keep]:
                del table[gone]

    def demand(self, known: AdapterRegistry, loader: OnDemandLoader) -> list[AdapterDemand]:
        return [
            AdapterDemand(
                name=spec.name,
                base_model=spec.base_model,
                rate=self.rates.get(spec.name, 0.0),
                queued_tokens=loader.waiting_tokens.get(spec.name, 0),
                last_used=self.last_used.get(spec.name),
                waiting=loader.waiting.get(spec.name, 0),
            )
            for spec in known
        ]


class PlacementController:
    """The loop (see the module docstring)."""

    def __init__(
        self,
        *,
        endpoints: EndpointRegistry,
        adapters: AdapterRegistry,
        actuator: LoraActuator,
        loader: OnDemandLoader,
        demand: DemandTracker,
        settings: LoraSettings,
        placement: PlacementSettings,
        metrics: LoraMetrics,
    ) -> None:
        self._endpoints = endpoints
        self._adapters = adapters
        self._actuator = actuator
        self._loader = loader
        self.demand = demand
        self._settings = settings
        self._placement = placement
        self._metrics = metrics
        self.last_plan: tuple[PlacementAction, ...] = ()

    async def run(self) -> None:
        """Step every ``placement_interval_s``, forever (a supervised task); with the
        controller off (0), only reconcile, every :data:`RECONCILE_S` (the engines' snapshots
        still need their slots, the metrics what appeared or vanished)."""
        interval = self._settings.placement_interval_s
        while True:
            await anyio.sleep(interval or RECONCILE_S)
            if interval:
                await self.step()
            else:
                self.reconcile()

    def reconcile(self) -> None:
        appeared, vanished = self._actuator.book.reconcile(self._endpoints)
        self._actuator.backoff.sync(self._adapters, {state.id for state in self._endpoints})
        listed = {card.id for state in self._endpoints for card in state.models if card.parent}
        self.demand.prune(listed | {spec.name for spec in self._adapters})
        if appeared:
            self._metrics.reconciled.labels(change="appeared").inc(appeared)
        if vanished:
            self._metrics.reconciled.labels(change="vanished").inc(vanished)
            log.info("%d adapter(s) no longer listed by their engines (restart or unload)",
                     vanished)  # fmt: skip

    async def step(self) -> tuple[PlacementAction, ...]:
        """One round: reconcile, measure demand, plan, act. Returns the actions planned."""
        book = self._actuator.book
        self.reconcile()
        now = book.clock()
        self.demand.tick(now, self._adapters)
        engines = book.slots(
            self._endpoints,
            last_used=self.demand.last_used,
            blocked=self._actuator.backoff.blocked(),
        )
        demand = self.demand.demand(self._adapters, self._loader)
        actions = plan(demand, engines, now=now, settings=self._placement)
        self.last_plan = actions
        held_off = suppressed(demand, engines, now=now, settings=self._placement)
        if held_off:
            self._metrics.suppressed.labels(reason="demand").inc(len(held_off))
        for action in actions:
            self._metrics.decisions.labels(op=action.kind, reason=action.reason).inc()
        if actions:
            await self.execute(actions, planned_at=now)
        return actions

    async def execute(
        self, actions: Sequence[PlacementAction], *, planned_at: float | None = None
    ) -> None:
        """Run ``actions``: in order per engine, engines in parallel. An unload of an
        adapter requested after ``planned_at`` (the plan's clock) is not made: the plan
        judged it idle, and that request may be running on it now."""
        by_engine: dict[str, list[PlacementAction]] = {}
        for action in actions:
            by_engine.setdefault(action.engine_id, []).append(action)
        async with anyio.create_task_group() as tg:
            for engine_id, todo in by_engine.items():
                tg.start_soon(self._engine_actions, engine_id, todo, planned_at)

    async def _engine_actions(
        self, engine_id: str, todo: Sequence[PlacementAction], planned_at: float | None
    ) -> None:
        for action in todo:
            state = self._endpoints.get(engine_id)
            if state is None:
                return
            try:
                if action.kind == "unload":
                    used = self.demand.last_used.get(action.adapter)
                    if planned_at is not None and used is not None and used > planned_at:
                        log.info("not unloading %s from %s (%s): requested since the plan",
                                 action.adapter, engine_id, action.reason)  # fmt: skip
                        if action.reason == "make_room":
                            return  # the load after it needed that slot
                        continue
                    await self._actuator.unload(state, action.adapter, reason=action.reason)
                    continue
                spec = self._adapters.get(action.adapter)
                if spec is None:  # unregistered since the plan
                    continue
                future = self._actuator.start_load(state, spec, reason=action.reason)
                await future
            except GatewayError as exc:
                log.warning("placement %s of %s on %s failed: %s", action.kind,
                            action.adapter, engine_id, exc.message)  # fmt: skip
                return  # the rest of this engine's actions assumed this one

    def snapshot(self) -> Mapping[str, object]:
        """JSON-able state for the admin API: rates, waiting requests, the last plan."""
        return {
            "rates": dict(self.demand.rates),
            "waiting": dict(self._loader.waiting),
            "last_plan": [
                {"kind": a.kind, "adapter": a.adapter, "engine": a.engine_id, "reason": a.reason}
                for a in self.last_plan
            ],
        }
