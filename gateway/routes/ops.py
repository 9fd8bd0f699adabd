"""Operational routes: ``/health`` (liveness), ``/ready`` (a healthy engine; Redis state when
shared), ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.errors import NoHealthyEndpoint
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
    """200 when at least one engine is healthy, else 503; always lists every engine."""
    services = services_of(request)
    endpoints = services.endpoints
    detail = [state.describe() for state in endpoints]
    healthy = sum(1 for state in endpoints if state.healthy)
    extra: dict[str, Any] = {}
    if services.redis is not None:
        # Degraded Redis does not make the gateway unready: it serves on local state (limits
        # at each replica's fair share) and says so here and in switchyard_redis_up.
        shared = services.redis.describe()
        shared["limits"] = "shared" if services.redis.up else "local_fair_share"
        if services.shared is not None:
            shared["replicas"] = services.shared.replicas()
            shared["routing_state"] = services.shared.describe()
        extra["redis"] = shared
    if healthy:
        return JSONBytes(
            {"status": "ready", "healthy_engines": healthy, "engines": detail, **extra}
        )
    exc = NoHealthyEndpoint(f"no healthy engine ({len(detail)} registered)")
    return error_response(
        exc, extra={"status": "not_ready", "healthy_engines": 0, "engines": detail, **extra}
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(services_of(request).metrics.render(), media_type=CONTENT_TYPE)
