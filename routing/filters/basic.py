"""Basic filters (healthy, serves-model): which endpoints may serve a request at all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.types import EndpointSnapshot, RouteRequest


@dataclass(frozen=True, slots=True)
class Healthy:
    """Keeps endpoints that pass health checks. Example: ``Healthy().filter(req, eps)``."""

    name: str = "healthy"

    def filter(
        self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]
    ) -> Sequence[EndpointSnapshot]:
        return [ep for ep in endpoints if ep.healthy]


@dataclass(frozen=True, slots=True)
class ServesModel:
    """Keeps endpoints that list the requested model (or adapter) in ``/v1/models``.

    An endpoint whose model list is still unknown (empty) is kept: it may serve anything.
    """

    name: str = "serves-model"

    def filter(
        self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]
    ) -> Sequence[EndpointSnapshot]:
        want = req.adapter or req.model
        return [ep for ep in endpoints if not ep.models or want in ep.models]
