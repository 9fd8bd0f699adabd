"""Admin API for LoRA adapters (behind the admin key, see :mod:`gateway.routes.admin`).

``GET /admin/adapters`` lists every registered adapter (``origin``: ``config``, ``admin`` or
``configmap``; ``engines``: the engines that list it now; ``load_state`` ``ok``, ``backoff``
or ``broken`` with ``last_error``, ``last_status``, ``retry_at`` and ``failed_on`` when
engines refused its loads, :meth:`gateway.lora.LoraManager.load_state`) and the placement
controller's state (request rates, requests waiting for a load, the last plan); ``GET
/admin/adapters/{name}`` one of them; ``POST /admin/adapters`` ``{name, base_model, source,
rank?}`` registers one (201; 400 when the name is taken or the source unsupported);
``DELETE /admin/adapters/{name}`` unregisters an adapter added here and unloads it from
every engine that lists it or is loading it (:meth:`gateway.lora.LoraManager.unload_everywhere`,
which also unloads the entries removed from the ConfigMap; config and ConfigMap entries
change at their source: 400). The registry is in memory (docs/lora.md): entries added here are this
replica's, until it restarts.

Example::

    curl -X POST localhost:8000/admin/adapters -H "authorization: Bearer $ADMIN_KEY" \\
         -d '{"name": "sql", "base_model": "llama", "source": "/models/lora-sql", "rank": 8}'
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError

from gateway.adapters import AdapterConflict, AdapterRefused, AdapterSpec, Origin
from gateway.errors import InvalidField, InvalidJSON, NotFound
from gateway.lora import LoraManager
from gateway.responses import JSONBytes
from gateway.routes.admin import admin_services
from gateway.services import Services
from gateway.settings import LoraAdapterConfig

router = APIRouter(prefix="/admin")
log = logging.getLogger(__name__)


def _lora(services: Services) -> LoraManager:
    if services.lora is None:
        raise NotFound("LoRA management is not set up in this gateway")
    return services.lora


def _describe(services: Services, spec: AdapterSpec) -> dict[str, Any]:
    engines = [s.id for s in services.endpoints if any(c.id == spec.name for c in s.models)]
    return {**spec.describe(), "engines": engines, **_lora(services).load_state(spec)}


@router.get("/adapters")
async def list_adapters(request: Request) -> JSONBytes:
    services = admin_services(request)
    lora = _lora(services)
    return JSONBytes({
        "adapters": [_describe(services, spec) for spec in lora.adapters],
        "placement": lora.controller.snapshot(),
    })  # fmt: skip


@router.get("/adapters/{name:path}")
async def get_adapter(request: Request, name: str) -> JSONBytes:
    services = admin_services(request)
    spec = _lora(services).adapters.get(name)
    if spec is None:
        raise NotFound(f"no adapter named {name!r}", param="name")
    return JSONBytes(_describe(services, spec))


@router.post("/adapters")
async def create_adapter(request: Request) -> JSONBytes:
    services = admin_services(request)
    lora = _lora(services)
    raw = await request.body()
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON("the request body is not valid JSON") from exc
    try:
        cfg = LoraAdapterConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidField(f"{param}: {first['msg']}" if param else first["msg"],
                           param=param) from exc  # fmt: skip
    try:
        spec = lora.adapters.add(AdapterSpec.from_config(cfg, Origin.ADMIN))
    except AdapterConflict as exc:
        raise InvalidField(str(exc), param="name") from exc
    except AdapterRefused as exc:  # the name (same as its base model), or a full registry
        raise InvalidField(str(exc), param=exc.param) from exc
    except ValueError as exc:  # the resolver refused the source
        raise InvalidField(str(exc), param="source") from exc
    lora.actuator.backoff.forget(spec.name)  # a new registration starts afresh
    log.info("adapter %s registered (base %s) through the admin API", spec.name, spec.base_model)
    return JSONBytes(_describe(services, spec), status_code=201)


@router.delete("/adapters/{name:path}")
async def delete_adapter(request: Request, name: str) -> JSONBytes:
    services = admin_services(request)
    lora = _lora(services)
    try:
        spec = lora.adapters.remove(name, origin=Origin.ADMIN)
    except KeyError as exc:
        raise NotFound(f"no adapter named {name!r}", param="name") from exc
    except AdapterConflict as exc:
        raise InvalidField(str(exc), param="name") from exc
    unloaded, failed = await lora.unload_everywhere(name, reason="admin")
    return JSONBytes({"removed": spec.describe(), "unloaded": unloaded, "failed": failed})
