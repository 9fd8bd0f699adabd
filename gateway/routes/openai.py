"""OpenAI-compatible routes served by FastAPI: the model list (only what the caller's key may
use: a hidden model is as unknown as a missing one; registered LoRA adapters that no engine
lists yet are included, with ``parent``), and ``principal_of`` for FastAPI routes.

The proxied routes (chat, completions, embeddings) are raw ASGI, in front of FastAPI:
:mod:`gateway.routes.proxied`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.errors import ModelNotFound
from gateway.principal import Principal
from gateway.responses import JSONBytes
from gateway.services import Services

router = APIRouter()
_MODEL_CREATED = 1700000000


def services_of(request: Request) -> Services:
    services: Services = request.state.services
    return services


def principal_of(request: Request, services: Services) -> Principal:
    """The caller of a FastAPI route (401 for a missing, wrong or revoked key)."""
    return services.keys.authenticate(request.headers.get("authorization"))


def _card_json(card_id: str, raw: dict[str, Any]) -> dict[str, Any]:
    if raw:
        return raw
    return {"id": card_id, "object": "model", "created": _MODEL_CREATED, "owned_by": "switchyard"}


@router.get("/v1/models")
async def list_models(request: Request) -> JSONBytes:
    services = services_of(request)
    principal = principal_of(request, services)
    catalog = services.endpoints.catalog()
    data = [
        _card_json(model_id, dict(entry.card.raw))
        for model_id, entry in sorted(catalog.items())
        if entry.healthy and principal.allows(*entry.card.target())
    ]
    if services.lora is not None:  # registered adapters loaded nowhere yet, with parent
        data += services.lora.cards(catalog, principal.allows)
        data.sort(key=lambda card: str(card.get("id")))
    return JSONBytes({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> JSONBytes:
    services = services_of(request)
    principal = principal_of(request, services)
    catalog = services.endpoints.catalog()
    entry = catalog.get(model_id)
    if entry is None or not entry.healthy or not principal.allows(*entry.card.target()):
        lora = services.lora
        for card in lora.cards(catalog, principal.allows) if lora is not None else ():
            if card["id"] == model_id:
                return JSONBytes(card)
        raise ModelNotFound(model_id)
    return JSONBytes(_card_json(model_id, dict(entry.card.raw)))
