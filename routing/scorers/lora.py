"""LoRA affinity scorer: prefer engines where the request's adapter already is.

Scores (GIE's ``lora-affinity-scorer`` order, with our loading state):

=========================================================  =====
the adapter is loaded and has requests running or waiting  1.0
the adapter is loaded (idle: may need a GPU swap-in)       0.9
the gateway is loading it there                            0.6
the engine serves the base model and has a free LoRA slot  0.3
anything else (no slot, unknown model list)                0.0
=========================================================  =====

Combined with load and prefix-cache scores it concentrates one adapter's traffic on the
engines that hold it (affinity: their GPU slot is warm and their prefix cache holds its
blocks, seeded by adapter) while the load scorers spread it over those replicas. In the
built-in policies the candidates are the engines listing the adapter (``serves-model``), so
it tells active from idle replicas; with the ``serves-adapter`` filter in a profile it also
ranks loading and free-slot engines. It only applies to requests naming an adapter
(``adapter_only``): :class:`routing.Policy` leaves it and its weight out for base-model
requests, whose scores stay what they were without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from routing.types import EndpointSnapshot, RouteRequest

__all__ = ["LoraAffinity"]


@dataclass(frozen=True, slots=True)
class LoraAffinity:
    """Example: ``LoraAffinity().score(RouteRequest(model="llama", adapter="sql"), eps)``."""

    adapter_only: ClassVar[bool] = True
    """:class:`routing.Policy` skips this scorer (and its weight) when ``req.adapter`` is None."""

    active: float = 1.0
    loaded: float = 0.9
    loading: float = 0.6
    free_slot: float = 0.3
    name: str = "lora-affinity"

    def __post_init__(self) -> None:
        if not 0.0 <= self.free_slot <= self.loading <= self.loaded <= self.active <= 1.0:
            raise ValueError("need 0 <= free_slot <= loading <= loaded <= active <= 1")

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]:
        adapter = req.adapter
        if adapter is None:
            return [1.0] * len(endpoints)
        return [self._one(adapter, req.model, ep) for ep in endpoints]

    def _one(self, adapter: str, base_model: str, ep: EndpointSnapshot) -> float:
        if adapter in ep.models:
            return self.active if adapter in ep.running_adapters else self.loaded
        if adapter in ep.loading_adapters:
            return self.loading
        if base_model in ep.models and ep.free_lora_slots > 0:
            return self.free_slot
        return 0.0
