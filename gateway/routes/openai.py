"""OpenAI-compatible routes: chat, completions, embeddings (proxied) and the model list.

A proxied route reads the raw body, parses only the routing fields, resolves the model (a
LoRA adapter routes as ``adapter`` of its base model), lets :class:`gateway.router.Router`
hash the prompt, look up the prefix index and ask the chosen policy for a ranking, and hands
the original bytes to :class:`gateway.proxy.ProxyResponse`.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.context import current_request_id
from gateway.errors import ModelNotFound, NoHealthyEndpoint, Unauthorized
from gateway.parsing import Kind, RequestFields, parse_request
from gateway.proxy import ProxyPlan
from gateway.responses import JSONBytes
from gateway.router import ROUTING_HEADER
from gateway.services import Services

router = APIRouter()
_MODEL_CREATED = 1700000000


def services_of(request: Request) -> Services:
    services: Services = request.state.services
    return services


def check_auth(request: Request, services: Services) -> None:
    keys = services.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        for key in keys:
            if hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
                return
    raise Unauthorized("Incorrect or missing API key; send 'Authorization: Bearer <key>'.")


def _resolve_model(services: Services, model: str) -> tuple[str, str | None, bool]:
    """(base model, adapter or None, listed by an engine); raises 404/503 if nobody can serve."""
    endpoints = services.endpoints
    entry = endpoints.catalog().get(model)
    if entry is not None:
        if entry.card.parent:
            return entry.card.parent, model, True
        return model, None, True
    healthy = [state for state in endpoints if state.healthy]
    if not healthy:
        raise NoHealthyEndpoint("no healthy engine is available; try again shortly")
    if any(not state.models for state in healthy):
        return model, None, False  # an engine with an unknown model list may serve it
    raise ModelNotFound(model)


def _forward_headers(request: Request) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    for name in ("accept", "user-agent"):
        value = request.headers.get(name)
        if value:
            headers[name] = value
    rid = current_request_id()
    if rid:
        headers["x-request-id"] = rid
    return headers


async def _proxy(request: Request, kind: Kind) -> Response:
    started = time.perf_counter()
    services = services_of(request)
    check_auth(request, services)
    body = await request.body()
    fields: RequestFields = parse_request(body, kind)
    model, adapter, listed = _resolve_model(services, fields.model)
    routing = services.settings.routing
    policy = services.router.policy(request.headers.get(ROUTING_HEADER))
    routed = await services.router.route(
        kind,
        fields,
        model=model,
        adapter=adapter,
        policy=policy,
        session_key=request.headers.get(routing.session_header),
        explain=routing.debug_header,
    )
    plan = ProxyPlan(
        kind=kind,
        body=body,
        headers=_forward_headers(request),
        fields=fields,
        route=routed.route,
        decision=routed.decision,
        started=started,
        model_label=fields.model if listed else "other",
        route_header=routed.explain() if routing.debug_header else None,
        hooks=routed,
    )
    return services.proxy.response(plan)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _proxy(request, Kind.CHAT)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _proxy(request, Kind.COMPLETIONS)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    return await _proxy(request, Kind.EMBEDDINGS)


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
