"""OpenAI-compatible routes served by FastAPI: the model list, and the shared auth check.

The proxied routes (chat, completions, embeddings) are raw ASGI, in front of FastAPI:
:mod:`gateway.routes.proxied`.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request

from gateway.errors import ModelNotFound, Unauthorized
from gateway.responses import JSONBytes
from gateway.services import Services

router = APIRouter()
_MODEL_CREATED = 1700000000


def services_of(request: Request) -> Services:
    services: Services = request.state.services
    return services


def check_key(services: Services, authorization: str | None) -> None:
    """401 unless ``authorization`` is ``Bearer <one of the configured keys>`` (constant time)."""
    keys = services.settings.api_keys
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token:
        for key in keys:
            if hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
                return
    raise Unauthorized("Incorrect or missing API key; send 'Authorization: Bearer <key>'.")


def check_auth(request: Request, services: Services) -> None:
    check_key(services, request.headers.get("authorization"))


def _card_json(card_id: str, raw: dict[str, Any]) -> dict[str, Any]:
    if raw:
        return raw
    return {"id": card_id, "object": "model", "created": _MODEL_CREATED, "owned_by": "switchyard"}


@router.get("/v1/models")
async def list_models(request: Request) -> JSONBytes:
    services = services_of(request)
    check_auth(request, services)
    data = [
        _card_json(model_id, dict(entry.card.raw))
        for model_id, entry in sorted(services.endpoints.catalog().items())
        if entry.healthy
    ]
    return JSONBytes({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> JSONBytes:
    services = services_of(request)
    check_auth(request, services)
    entry = services.endpoints.catalog().get(model_id)
    if entry is None or not entry.healthy:
        raise ModelNotFound(model_id)
    return JSONBytes(_card_json(model_id, dict(entry.card.raw)))
