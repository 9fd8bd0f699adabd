"""Operational routes: ``/health`` (liveness), ``/ready`` (readiness: this replica has
started; the engines and the Redis state in its body), ``/metrics``.

Why ``/ready`` does not require a healthy engine: readiness takes one replica out of the
Service so that traffic goes to the others. Having no healthy engine is not one replica's
condition but the whole fleet's (every replica fronts the same engines), so a probe failing
on it empties the Service: clients get connection errors instead of the 503 envelope with
``retry-after`` that the OpenAI SDKs retry, and with the engines scaled to zero
(``autoscaling.min_replicas: 0``) no request reaches the gateway that would count the demand
to scale them up again (a deadlock; the same for an external autoscaler scaling on the
gateway's request metrics). A replica that has not listed its engine pods yet (Kubernetes
discovery whose first list failed) is not ready: its peers that have serve better.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.errors import NotReady
from gateway.metrics import CONTENT_TYPE
from gateway.responses import JSONBytes, error_response
from gateway.routes.openai import services_of

router = APIRouter()


@router.get("/health")
async def health() -> JSONBytes:
    """The gateway process is up and serving (says nothing about engines)."""
    return JSONBytes({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONBytes:
    """200 once this replica has started: its settings loaded, its services open and, with
    Kubernetes discovery, the engine pods listed once (else 503 ``not_ready``). Healthy
    engines are not required (module docstring): the body says how many there are
    (``healthy_engines``, 0 while the pool is down or scaled to zero, when proxied requests
    get 503 ``no_healthy_endpoint`` with ``retry-after``) and lists every engine."""
    services = services_of(request)
    endpoints = services.endpoints
    detail = [state.describe() for state in endpoints]
    healthy = sum(1 for state in endpoints if state.healthy)
    extra: dict[str, Any] = {}
    discovery = services.discovery
    if discovery is not None:
        extra["discovery"] = {"listed": discovery.listed, "engines": len(discovery.owned)}
    if services.redis is not None:
        # Degraded Redis does not make the gateway unready: it serves on local state (limits
        # at each replica's fair share) and says so here and in switchyard_redis_healthy_ratio.
        shared = services.redis.describe()
        shared["limits"] = "shared" if services.redis.up else "local_fair_share"
        if services.shared is not None:
            shared["replicas"] = services.shared.replicas()
            shared["routing_state"] = services.shared.describe()
        extra["redis"] = shared
    body = {"healthy_engines": healthy, "engines": detail, **extra}
    if discovery is None or discovery.listed:
        return JSONBytes({"status": "ready", **body})
    exc = NotReady("the engine pods have not been listed yet (Kubernetes discovery)")
    return error_response(exc, extra={"status": "not_ready", **body})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(services_of(request).metrics.render(), media_type=CONTENT_TYPE)
