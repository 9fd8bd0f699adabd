"""LoRA filter: for a request naming an adapter, the engines that hold it or can take it.

Tiers, first non-empty wins (so one adapter's traffic concentrates where it is loaded, and a
failover never lands on an engine that would answer 404 while a holder remains):

1. engines listing the adapter in ``/v1/models`` (loaded), with engines whose model list is
   still unknown (they may serve anything, as :class:`routing.filters.ServesModel` keeps them);
2. else engines the gateway is loading it onto (``EndpointSnapshot.loading_adapters``): the
   request waits for that load rather than starting another (coalescing);
3. else engines of the base model (``RouteRequest.model`` listed) with a free LoRA slot
   (``EndpointSnapshot.free_lora_slots``): the gateway loads it on the chosen one first.

An empty result makes the policy raise ``NoEndpointError``: no engine can take the adapter
now. Tiers 2 and 3 put engines that do not list the adapter at the head of the ranking, so
this filter is for callers that load on ``ranked[0]`` (or wait for its load in progress)
before sending; it is opt-in (``serves-adapter`` in a routing profile). The built-in
policies keep :class:`routing.filters.ServesModel` (tier 1 only): Switchyard's gateway
loads an adapter no healthy engine lists *before* routing (on-demand load, docs/lora.md),
so by then tier 1 holds it, and an engine left out by admission caps or ejection must not
be replaced by one that answers 404. Spreading a hot adapter over more engines is the
placement controller's job (:mod:`routing.lora`). Requests for a base model pass through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.types import EndpointSnapshot, RouteRequest

__all__ = ["ServesAdapter", "adapter_tiers"]


def adapter_tiers(
    adapter: str, base_model: str, endpoints: Sequence[EndpointSnapshot]
) -> Sequence[EndpointSnapshot]:
    """The first non-empty tier for ``adapter`` of ``base_model`` (module docstring)."""
    loaded = [ep for ep in endpoints if not ep.models or adapter in ep.models]
    if loaded:
        return loaded
    loading = [ep for ep in endpoints if adapter in ep.loading_adapters]
    if loading:
        return loading
    return [ep for ep in endpoints if base_model in ep.models and ep.free_lora_slots > 0]


@dataclass(frozen=True, slots=True)
class ServesAdapter:
    """Keeps the engines that hold the request's adapter or can take it (module docstring).

    Example: ``ServesAdapter().filter(RouteRequest(model="llama", adapter="sql"), eps)``.
    """

    name: str = "serves-adapter"

    def filter(
        self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]
    ) -> Sequence[EndpointSnapshot]:
        if req.adapter is None:
            return endpoints
        return adapter_tiers(req.adapter, req.model, endpoints)
