"""Admin API: list, add and remove engines at runtime, and reload engines from the config file.

``POST /admin/engines {"url": ..., "id"?: ..., "models"?: [...]}`` probes the new engine at
once; ``DELETE /admin/engines/{id}`` takes it out of routing (requests in flight finish);
``POST /admin/reload`` re-reads the ``engines`` section of the ``--config`` file and applies
the difference. API keys: :mod:`gateway.routes.keys`.

Every admin route takes the admin key only (:meth:`gateway.keys.KeyStore.check_admin`):
with ``admin_key`` set, ``Authorization: Bearer <admin_key>`` (missing or wrong: 401, a client
key: 403); without it the admin API is open only while no client keys are configured (the
local default), else 403. ``admin_enabled: false`` hides it (404).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.endpoints import default_endpoint_id
from gateway.errors import ClientError, InvalidField, NotFound
from gateway.responses import JSONBytes
from gateway.routes.openai import services_of
from gateway.services import Services, add_engine
from gateway.settings import EngineConfig, Settings

router = APIRouter(prefix="/admin")


def admin_services(request: Request) -> Services:
    """The services, once the caller has passed the admin check (404 when disabled)."""
    services = services_of(request)
    if not services.settings.admin_enabled:
        raise NotFound("the admin API is disabled")
    services.keys.check_admin(request.headers.get("authorization"))
    return services


@router.get("/engines")
async def list_engines(request: Request) -> JSONBytes:
    services = admin_services(request)
    return JSONBytes({"engines": [state.describe() for state in services.endpoints]})


@router.post("/engines")
async def add(request: Request, engine: EngineConfig) -> JSONBytes:
    services = admin_services(request)
    try:
        state = add_engine(services.endpoints, engine)
    except KeyError as exc:
        raise InvalidField(str(exc.args[0]), param="id") from exc
    await services.health.probe(state)
    return JSONBytes(state.describe(), status_code=201)


@router.delete("/engines/{endpoint_id:path}")
async def remove(request: Request, endpoint_id: str) -> JSONBytes:
    services = admin_services(request)
    try:
        state = services.endpoints.remove(endpoint_id)
    except KeyError as exc:
        raise NotFound(f"no engine with id {endpoint_id!r}", param="id") from exc
    services.router.forget(endpoint_id)
    return JSONBytes({"removed": state.describe()})


@router.post("/reload")
async def reload(request: Request) -> JSONBytes:
    services = admin_services(request)
    if services.config_path is None:
        raise ClientError("the gateway was not started with --config; nothing to reload")
    try:
        fresh = Settings.load(services.config_path)
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot reload {services.config_path}: {exc}") from exc
    wanted = {engine.id or default_endpoint_id(engine.url): engine for engine in fresh.engines}
    current = {state.id for state in services.endpoints}
    removed = sorted(current - wanted.keys())
    for eid in removed:
        services.endpoints.remove(eid)
        services.router.forget(eid)
    added = []
    for eid, engine in wanted.items():
        if eid not in current:
            add_engine(services.endpoints, engine)
            added.append(eid)
    for eid in added:
        state = services.endpoints.get(eid)
        if state is not None:
            await services.health.probe(state)
    return JSONBytes({"added": added, "removed": removed})
