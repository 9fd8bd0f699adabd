"""The proxied OpenAI routes (chat, completions, embeddings) as raw ASGI, in front of FastAPI.

A proxied request needs none of what FastAPI adds per request (a ``Request`` object, route
matching over every route, dependency solving, exception middleware): this app matches the
three paths by a dict lookup, reads the raw body, parses only the routing fields, resolves
the model (a LoRA adapter routes as ``adapter`` of its base model), asks
:class:`gateway.router.Router` for a ranking and runs the proxy's ASGI response on the
original bytes. Everything else goes to the FastAPI app unchanged. Errors before the proxy
starts are OpenAI envelopes (:func:`gateway.errors.send_error`).

With autoscaling enabled, each request is one arrival for the autoscaler
(:class:`autoscale.arrivals.ArrivalCounter`), counted once it is authenticated, parsed and
within its limits and quotas -- before the admission wait, so a request later shed, or
refused because no engine serves its model right now, is demand counted at once; one that
fails authentication, its limits or validation is not.

Example::

    app = ProxiedRoutes(fastapi_app, guard=ConcurrencyGuard(4096), max_body_bytes=4 << 20)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admission import disconnected
from gateway.context import current_request_id
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    NoHealthyEndpoint,
    send_error,
)
from gateway.exchange import ProxyPlan
from gateway.middleware import ConcurrencyGuard, declared_too_large, read_body
from gateway.parsing import Kind, RequestFields, parse_request
from gateway.principal import Principal
from gateway.quota import UNLIMITED, Quota, admit
from gateway.router import ROUTING_HEADER
from gateway.services import Services
from gateway.streamusage import with_include_usage

PROXIED_PATHS: dict[str, Kind] = {kind.value: kind for kind in Kind}
_FORWARDED = (b"accept", b"user-agent")


class ProxiedRoutes:
    """``POST`` on a :data:`PROXIED_PATHS` path is proxied here, under ``guard`` and the body
    limit (applied inline: no middleware levels on the hot path); the rest goes to ``app``."""

    def __init__(self, app: ASGIApp, *, guard: ConcurrencyGuard, max_body_bytes: int) -> None:
        self.app = app
        self.guard = guard
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = PROXIED_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        services: Services = scope["state"]["services"]
        quota = UNLIMITED
        principal: Principal | None = None
        fields: RequestFields | None = None
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['method']} is not allowed here")
            with self.guard:
                headers: dict[bytes, bytes] = dict(scope["headers"])
                principal = services.keys.authenticate(_text(headers.get(b"authorization")))
                refused = declared_too_large(headers.get(b"content-length"), self.max_body_bytes)
                if refused is not None:
                    raise refused
                body = await read_body(receive, self.max_body_bytes)
                if body is None:
                    return  # the client left while sending its body: nobody will read an answer
                fields = parse_request(body, kind)
                unserved: NoHealthyEndpoint | None = None
                try:
                    model, adapter, listed = _resolve_model(services, fields.model, principal)
                except NoHealthyEndpoint as exc:  # demand all the same, once within limits
                    unserved, model, adapter, listed = exc, fields.model, None, False
                quota = await admit(
                    services.limiter, principal, fields, kind, services.settings.limits
                )
                if unserved is not None:
                    _arrived(services, model, fields)
                    raise unserved
                incoming = Incoming(kind, headers, body, started, fields, model, adapter, listed)
                if adapter is not None and services.lora is not None:  # demand, on-demand load
                    await services.lora.before_route(
                        adapter, prompt_tokens=fields.prompt_tokens_estimate,
                        gone=disconnected(receive),
                    )  # fmt: skip
                plan = await _plan(services, incoming, quota, receive, principal)
                await services.proxy.serve(plan, receive, send)
        except GatewayError as exc:  # raised before the proxy answered anything
            quota.refund()  # nothing reached an engine: the reserved tokens go back
            await send_error(send, exc, quota.headers)
            if services.access_log is not None:
                services.access_log.refused(
                    kind=kind, status=exc.status, error=type(exc).__name__,
                    model=None if fields is None else fields.model,
                    key_id=None if principal is None else principal.key_id,
                    duration_s=time.perf_counter() - started,
                )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Incoming:
    """One proxied request once authenticated, parsed and resolved (before routing)."""

    kind: Kind
    headers: dict[bytes, bytes]
    body: bytes
    started: float
    fields: RequestFields
    model: str  # the base model
    adapter: str | None
    listed: bool  # an engine lists the model (else it is labelled "other" in metrics)


async def _plan(
    services: Services, incoming: Incoming, quota: Quota, receive: Receive, principal: Principal
) -> ProxyPlan:
    fields, headers, body = incoming.fields, incoming.headers, incoming.body
    strip_usage = quota.meters_tokens and fields.stream and not fields.include_usage
    if strip_usage:
        body = with_include_usage(fields.document)  # settle on the engine's usage; hidden
    routing = services.settings.routing
    policy = services.router.policy(_text(headers.get(ROUTING_HEADER.encode())))
    _arrived(services, incoming.model, fields)  # before any wait: once, however it ends
    route = partial(
        services.router.route,
        incoming.kind,
        fields,
        model=incoming.model,
        adapter=incoming.adapter,
        policy=policy,
        session_key=_text(headers.get(routing.session_header.encode())),
        explain=routing.debug_header,
    )
    admission = services.admission
    if admission.active:  # concurrency caps: wait for room (by priority) or get a 503
        want = incoming.adapter or incoming.model
        routed = await admission.admit(
            route,
            priority=principal.priority,
            has_room=admission.room_for(want),
            gone=disconnected(receive),
        )
    else:
        routed = await route()
    return ProxyPlan(
        kind=incoming.kind,
        body=body,
        headers=_forward_headers(headers),
        fields=fields,
        route=routed.route,
        decision=routed.decision,
        started=incoming.started,
        model_label=fields.model if incoming.listed else "other",
        route_header=routed.explain() if routing.debug_header else None,
        hooks=routed,
        response_headers=quota.headers,
        strip_usage=strip_usage,
        on_finish=quota.settlement,
        key_id=principal.key_id,
    )


def _arrived(services: Services, model: str, fields: RequestFields) -> None:
    """One arrival for the autoscaler (nothing when autoscaling is disabled)."""
    arrivals = services.router.arrivals
    if arrivals is not None:
        arrivals.arrived(
            model, prompt_tokens=fields.prompt_tokens_estimate, max_tokens=fields.max_tokens
        )


def _resolve_model(
    services: Services, model: str, principal: Principal
) -> tuple[str, str | None, bool]:
    """(base model, adapter or None, listed by an engine); raises 404/503 if nobody can serve.

    A model the caller may not use gets exactly an unknown model's 404, before anything that
    could tell the two apart (a 503 while no engine is healthy, a pass-through)."""
    endpoints = services.endpoints
    entry = endpoints.catalog().get(model)
    if entry is not None:
        base, adapter = entry.card.target()
        if not principal.allows(base, adapter):
            raise ModelNotFound(model)
        return base, adapter, True
    spec = services.lora.adapters.get(model) if services.lora is not None else None
    if spec is not None:  # registered, loaded nowhere yet: loaded on demand before routing
        if not principal.allows(spec.base_model, spec.name):
            raise ModelNotFound(model)
        return spec.base_model, spec.name, True
    if principal.models is not None and model not in principal.models:
        raise ModelNotFound(model)
    healthy = [state for state in endpoints if state.healthy]
    if not healthy:
        raise NoHealthyEndpoint("no healthy engine is available; try again shortly")
    if any(not state.models for state in healthy):
        return model, None, False  # an engine with an unknown model list may serve it
    raise ModelNotFound(model)


def _forward_headers(headers: dict[bytes, bytes]) -> dict[str, str]:
    out = {"content-type": "application/json"}
    for name in _FORWARDED:
        value = headers.get(name)
        if value:
            out[name.decode()] = value.decode("latin-1")
    rid = current_request_id()
    if rid:
        out["x-request-id"] = rid
    return out


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
