"""On-demand LoRA loads: a request for a registered adapter that no healthy engine holds
waits while one engine loads it.

:meth:`OnDemandLoader.ensure` asks :func:`routing.lora.choose_for_load` where to load
(an engine of the base model with a free slot, else one where an idle adapter can make
room) and starts that load with :meth:`gateway.lora_actuator.LoraActuator.start_load`.
Every request for the same adapter that arrives while the load runs waits on the same
future (one load per adapter, however many requests), including a load the placement
controller started. Each waiter waits at most ``lora.load_timeout_s`` (the load itself
goes on, bounded by ``lora.request_timeout_s``, and serves the next requests), and each
gets an answer of its own:

* the load succeeded: ``ensure`` returns and the request is routed as usual (the engine
  now lists the adapter, so routing sends it there);
* the engine refused it with a 4xx: that status and the engine's message
  (:class:`gateway.errors.AdapterRejected`); a 5xx or no connection: 502
  (:class:`gateway.errors.AdapterLoadFailed`); the engine's call timed out: 504;
* every engine that could load it refused or failed its last load and backs off
  (:class:`gateway.lora_actuator.LoadBackoff`): that remembered error at once (a 4xx the
  engine's status and message), no load started, no room made; the first request after
  the backoff tries again, so a fixed source recovers;
* no engine has a free slot and none can make room (every adapter within minimum residency
  or in use): the request waits, asking again every :data:`SLOT_POLL_S` (and the placement
  controller sees it waiting), until a slot can be had or ``lora.load_timeout_s`` has
  passed: then 503 with ``retry-after`` (:class:`gateway.errors.AdapterUnavailable`); at
  once only when no healthy engine of the base model exists;
* the wait ran out while loading: 503 with ``retry-after``
  (:class:`gateway.errors.AdapterLoadTimeout`). The whole wait (for a slot, then for the
  load) is bounded by ``lora.load_timeout_s``;
* the adapter was unregistered while the request waited for a slot: 404
  ``model_not_found``, as for any unknown model (nothing is loaded for it);
* the gateway is shutting down (:meth:`gateway.shutdown.InFlight.cancel_all`): 503
  ``shutting_down``, like every other request still in progress.

Example::

    await loader.ensure(spec, prompt_tokens=120, gone=disconnected(receive))
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

from gateway.adapters import AdapterSpec
from gateway.endpoints import EndpointRegistry
from gateway.errors import (
    AdapterLoadFailed,
    AdapterLoadTimeout,
    AdapterRejected,
    AdapterUnavailable,
    ClientError,
    GatewayError,
    ModelNotFound,
    ShuttingDown,
    UpstreamTimeout,
)
from gateway.lora_actuator import LoraActuator
from gateway.lora_metrics import LoraMetrics
from gateway.settings import LoraSettings
from gateway.shutdown import InFlight
from routing.lora import PlacementSettings, blocked_everywhere, choose_for_load

__all__ = ["OnDemandLoader"]

Gone = Callable[[], Awaitable[object]]

SLOT_POLL_S = 0.25
"""How often a request waiting for a free slot asks :func:`choose_for_load` again."""


class _NoSlot(Exception):
    """No engine can take the adapter now (but some engine of its base model exists)."""


class OnDemandLoader:
    """See the module docstring. ``last_used``: each adapter's last request (clock seconds),
    for the LRU choice of an adapter to unload when making room."""

    def __init__(
        self,
        *,
        endpoints: EndpointRegistry,
        actuator: LoraActuator,
        settings: LoraSettings,
        placement: PlacementSettings,
        metrics: LoraMetrics,
        last_used: Callable[[], Mapping[str, float]],
        inflight: InFlight | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._inflight = inflight
        self._actuator = actuator
        self._settings = settings
        self._placement = placement
        self._metrics = metrics
        self._last_used = last_used
        self.waiting: dict[str, int] = {}  # adapter -> requests waiting for its load now
        self.waiting_tokens: dict[str, int] = {}  # adapter -> their prompt tokens

    async def ensure(
        self, spec: AdapterSpec, *, prompt_tokens: int = 0, gone: Gone | None = None
    ) -> None:
        """Return once ``spec`` is loaded on an engine; raise a :class:`GatewayError` that
        answers this request otherwise (module docstring)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        name = spec.name
        self.waiting[name] = self.waiting.get(name, 0) + 1
        self.waiting_tokens[name] = self.waiting_tokens.get(name, 0) + prompt_tokens
        outcome = "loaded"
        deadline = started + self._settings.load_timeout_s
        try:
            while True:  # bounded by the deadline
                current = self._actuator.adapters.get(name)
                if current is None:  # unregistered while it waited: load nothing
                    raise ModelNotFound(name)
                spec = current  # re-registered meanwhile: the registration of now
                try:
                    future = self._future(spec)
                except _NoSlot:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise AdapterUnavailable(
                            f"no engine serving `{spec.base_model}` had a free LoRA slot for"
                            f" adapter `{spec.name}` within"
                            f" {self._settings.load_timeout_s:g}s; retry shortly",
                            retry_after_s=self._settings.retry_after_s,
                        ) from None
                    tick: asyncio.Future[None] = loop.create_future()
                    handle = loop.call_later(min(SLOT_POLL_S, left), _settle, tick)
                    try:  # the tick fires first (at the deadline at the latest)
                        await self._wait(tick, gone, name, left + 1.0)
                    finally:
                        handle.cancel()
                    continue
                if future is not None:
                    left = max(0.0, deadline - loop.time())
                    await self._wait(future, gone, name, left)
                break
        except GatewayError as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self._metrics.on_demand.labels(outcome=outcome).inc()
            self._metrics.on_demand_wait.observe(loop.time() - started)
            _take(self.waiting, name, 1)
            _take(self.waiting_tokens, name, prompt_tokens)

    def _future(self, spec: AdapterSpec) -> asyncio.Future[None] | None:
        """The load to wait for: one in flight, else one started now (None: held already)."""
        actuator = self._actuator
        pending = actuator.pending(spec.name)
        if pending is not None:
            return pending
        backoff = actuator.backoff
        backoff.check(spec)
        slots = actuator.book.slots(
            self._endpoints, last_used=self._last_used(), blocked=backoff.blocked()
        )
        if blocked_everywhere(spec.name, spec.base_model, slots):
            self._metrics.suppressed.labels(reason="on_demand").inc()
            engines = [s.engine_id for s in slots if s.serves(spec.base_model)]
            raise backoff.refusal(spec.name, engines)
        actions = choose_for_load(
            spec.name, spec.base_model, slots, now=actuator.book.clock(), settings=self._placement
        )
        if actions is None:
            if not any(s.serves(spec.base_model) for s in slots):
                raise AdapterUnavailable(
                    f"no healthy engine serves `{spec.base_model}` for adapter `{spec.name}`",
                    retry_after_s=self._settings.retry_after_s,
                )
            raise _NoSlot
        if not actions:
            return None  # a healthy engine holds it (listed since the caller looked)
        for action in actions:
            self._metrics.decisions.labels(op=action.kind, reason=action.reason).inc()
        load = actions[-1]
        make_room = actions[0].adapter if len(actions) > 1 else None
        state = self._endpoints.get(load.engine_id)
        if state is None:  # the decision came from this registry: cannot happen
            raise AdapterLoadFailed(f"engine {load.engine_id} is gone")
        return actuator.start_load(state, spec, reason=load.reason, make_room=make_room)

    async def _wait(
        self, future: asyncio.Future[None], gone: Gone | None, name: str, limit_s: float
    ) -> None:
        """Wait for ``future`` at most ``limit_s``; return once it is done without error,
        raise the request's error otherwise."""
        loop = asyncio.get_running_loop()
        watch = loop.create_task(_until(gone)) if gone is not None else None
        stop: asyncio.Future[None] = loop.create_future()
        waits: set[asyncio.Future[object]] = {future, stop}  # type: ignore[arg-type]
        if watch is not None:
            waits.add(watch)  # type: ignore[arg-type]
        inflight = self._inflight
        token = None if inflight is None else inflight.add(partial(_settle, stop))
        try:
            await asyncio.wait(waits, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watch is not None:
                watch.cancel()
            if inflight is not None and token is not None:
                inflight.discard(token)
        if stop.done():
            raise ShuttingDown(
                "the gateway is shutting down; retry later",
                retry_after_s=self._settings.retry_after_s,
            )
        if future.done():
            exc = future.exception()
            if exc is not None:
                raise _fresh(exc)
            return
        if watch is not None and watch.done() and not watch.cancelled():
            raise _ClientGone(f"the client left while adapter `{name}` was loading")
        raise AdapterLoadTimeout(
            f"adapter `{name}` is still loading after {self._settings.load_timeout_s:g}s;"
            " retry shortly",
            retry_after_s=self._settings.retry_after_s,
        )


class _ClientGone(AdapterLoadTimeout):
    """The waiting client disconnected (answered like a timeout: nobody reads it)."""


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _until(gone: Gone) -> None:
    with contextlib.suppress(Exception):  # a server whose receive() fails: wait no more
        await gone()


def _fresh(exc: BaseException) -> GatewayError:
    """A copy of the load's error for one waiter (one exception object raised in many tasks
    would chain their tracebacks together)."""
    if isinstance(exc, AdapterRejected):
        return AdapterRejected(exc.message, status=exc.status)
    if isinstance(exc, UpstreamTimeout | AdapterLoadFailed):
        return type(exc)(exc.message)
    return AdapterLoadFailed(f"the adapter load failed: {exc}")


def _outcome(exc: GatewayError) -> str:
    if isinstance(exc, ShuttingDown):
        return "shutdown"
    if isinstance(exc, _ClientGone):
        return "disconnect"
    if isinstance(exc, AdapterLoadTimeout):
        return "timeout"
    if isinstance(exc, AdapterUnavailable):
        return "no_slot"
    if isinstance(exc, ClientError):  # the engine's 4xx, or unregistered while waiting
        return "rejected"
    return "failed"


def _take(counts: dict[str, int], key: str, n: int) -> None:
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
