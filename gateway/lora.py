"""High-density LoRA in the gateway: the adapter registry, on-demand loads and placement.

:class:`LoraManager` holds the parts (:mod:`gateway.adapters` registry,
:mod:`gateway.lora_actuator` book and actuator, :mod:`gateway.lora_loader` on-demand
loader, :mod:`gateway.placement` controller, :mod:`gateway.adapter_source` ConfigMap
reader) and is what the rest of the gateway talks to:

* the proxied routes call :meth:`LoraManager.before_route` for a request naming an adapter
  (never for a base model): it counts the request as demand and, when no healthy engine
  lists a registered adapter, waits for its on-demand load;
* ``/v1/models`` adds :meth:`LoraManager.cards`: registered adapters no healthy engine
  lists yet, with their ``parent``;
* the admin API (:mod:`gateway.routes.adapters`) edits the registry; an adapter it deletes,
  or one removed from the ConfigMap or given another source or base model there, leaves the
  engines through :meth:`LoraManager.unload_everywhere`;
* :meth:`LoraManager.run` is the supervised background task (the placement loop and the
  ConfigMap refresh).

Example::

    lora = LoraManager.build(settings, endpoints=registry, control=control,
                             registry=metrics.registry)
    await lora.before_route("sql", prompt_tokens=100)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

from gateway.adapter_source import ConfigMapAdapters
from gateway.adapters import AdapterRegistry, AdapterSpec, SourceResolver
from gateway.endpoints import EndpointRegistry, ModelEntry
from gateway.errors import GatewayError
from gateway.lora_actuator import LoadBackoff, LoraActuator, LoraBook
from gateway.lora_loader import OnDemandLoader
from gateway.lora_metrics import LoraCollector, LoraMetrics
from gateway.placement import DemandTracker, PlacementController
from gateway.settings import Settings
from gateway.shutdown import InFlight
from gateway.tasks import supervise
from gateway.upstream import Upstream
from routing.lora import PlacementSettings, blocked_everywhere

__all__ = ["LoraManager"]

log = logging.getLogger(__name__)


class LoraManager:
    """The LoRA parts of one gateway (see the module docstring)."""

    def __init__(
        self,
        *,
        settings: Settings,
        endpoints: EndpointRegistry,
        adapters: AdapterRegistry,
        actuator: LoraActuator,
        loader: OnDemandLoader,
        controller: PlacementController,
        metrics: LoraMetrics,
        configmap: ConfigMapAdapters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings.lora
        self._endpoints = endpoints
        self.adapters = adapters
        self.actuator = actuator
        self.loader = loader
        self.controller = controller
        self.metrics = metrics
        self.configmap = configmap
        self._clock = clock
        self._arrived = controller.demand.arrived

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        endpoints: EndpointRegistry,
        control: Upstream,
        registry: CollectorRegistry,
        resolver: SourceResolver | None = None,
        inflight: InFlight | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> LoraManager:
        lora = settings.lora
        adapters = AdapterRegistry(
            resolver,
            specs=(AdapterSpec.from_config(cfg) for cfg in lora.adapters),
            max_adapters=lora.max_adapters,
        )
        metrics = LoraMetrics.create(registry)
        registry.register(LoraCollector(adapters, endpoints))
        placement = PlacementSettings(**lora.placement)
        book = LoraBook(clock=clock, default_max_loras=lora.max_loras,
                        max_cpu_loras=lora.max_cpu_loras)  # fmt: skip
        actuator = LoraActuator(client=control, adapters=adapters, book=book, settings=lora,
                                metrics=metrics,
                                backoff=LoadBackoff(clock=clock, settings=placement))  # fmt: skip
        demand = DemandTracker(alpha=lora.rate_alpha)
        loader = OnDemandLoader(endpoints=endpoints, actuator=actuator, settings=lora,
                                placement=placement, metrics=metrics,
                                last_used=lambda: demand.last_used,
                                inflight=inflight)  # fmt: skip
        controller = PlacementController(
            endpoints=endpoints, adapters=adapters, actuator=actuator, loader=loader,
            demand=demand, settings=lora, placement=placement, metrics=metrics,
        )  # fmt: skip
        manager = cls(settings=settings, endpoints=endpoints, adapters=adapters,
                      actuator=actuator, loader=loader, controller=controller, metrics=metrics,
                      clock=clock)  # fmt: skip
        if lora.configmap is not None:  # Settings checked: discovery.kind kubernetes
            manager.configmap = ConfigMapAdapters(
                lora.configmap, settings.discovery, adapters,
                unload=functools.partial(manager.unload_everywhere, reason="configmap"),
            )  # fmt: skip
        return manager

    async def before_route(
        self,
        adapter: str,
        *,
        prompt_tokens: int = 0,
        gone: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """A request names ``adapter``: count it; when it is registered and no healthy
        engine lists it, wait for its on-demand load (raises the request's error)."""
        self._arrived(adapter, now=self._clock())
        entry = self._endpoints.catalog().get(adapter)
        if entry is not None and entry.healthy:
            return
        spec = self.adapters.get(adapter)
        if spec is None or not self.settings.on_demand:
            return
        await self.loader.ensure(spec, prompt_tokens=prompt_tokens, gone=gone)

    async def unload_everywhere(
        self, name: str, *, reason: str
    ) -> tuple[list[str], list[dict[str, str]]]:
        """Unload ``name`` from every engine that lists it or is loading it (after that
        load), once it was unregistered (admin ``DELETE``, removed from the ConfigMap) or
        its registration changed (the ConfigMap gave it another source or base model); its
        remembered load failures are forgotten. Returns (engines unloaded, ``{engine,
        error}`` of the unloads that failed); a failed unload is not retried."""
        self.actuator.backoff.forget(name)
        unloaded: list[str] = []
        failed: list[dict[str, str]] = []
        book = self.actuator.book
        for state in self._endpoints:
            # Engines still loading it too: that load lands after this call, and the unload
            # waits for it (else the engine would keep serving an adapter no longer registered).
            if name in book.loading(state.id) or any(card.id == name for card in state.models):
                try:
                    await self.actuator.unload(state, name, reason=reason)
                    unloaded.append(state.id)
                except GatewayError as exc:
                    log.warning("unloading adapter %s from %s failed (%s): %s",
                                name, state.id, reason, exc.message)  # fmt: skip
                    failed.append({"engine": state.id, "error": exc.message})
        return unloaded, failed

    def cards(
        self, catalog: Mapping[str, ModelEntry], allows: Callable[[str, str | None], bool]
    ) -> list[dict[str, Any]]:
        """``/v1/models`` entries of registered adapters no healthy engine lists, whose base
        model a healthy engine serves, and that ``allows`` (the caller's key) permits."""
        out = []
        for spec in self.adapters:
            entry = catalog.get(spec.name)
            if entry is not None and entry.healthy:
                continue
            base = catalog.get(spec.base_model)
            if base is None or not base.healthy or not allows(spec.base_model, spec.name):
                continue
            out.append(spec.card())
        return out

    def load_state(self, spec: AdapterSpec) -> dict[str, Any]:
        """The admin API's view of ``spec``'s loads: ``load_state`` ``ok``, ``backoff``
        (some engine refused or failed its last load and is not asked again before its
        backoff passes) or ``broken`` (every engine that could load it backs off: it is
        not placed, and its requests get the remembered error), plus
        :meth:`gateway.lora_actuator.LoadBackoff.describe` (``last_error``,
        ``last_status``, ``retry_at``, ``failed_on``)."""
        backoff = self.actuator.backoff
        backoff.check(spec)
        blocked = backoff.blocked()
        slots = self.actuator.book.slots(self._endpoints, last_used={}, blocked=blocked)
        if blocked_everywhere(spec.name, spec.base_model, slots):
            state = "broken"
        elif any(spec.name in names for names in blocked.values()):
            state = "backoff"
        else:
            state = "ok"
        return {"load_state": state, **backoff.describe(spec.name)}

    async def run(self) -> None:
        """The background work: the placement loop (reconciling only when
        ``placement_interval_s`` is 0) and the ConfigMap refresh (when configured)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervise, "lora-placement", self.controller.run)
            if self.configmap is not None:
                tg.start_soon(supervise, "lora-configmap", self.configmap.run)
            await anyio.sleep_forever()

    async def aclose(self) -> None:
        await self.actuator.aclose()
        if self.configmap is not None:
            self.configmap.close()
