"""The types one proxied request carries between the route, the router and the proxy.

A leaf module (it imports only :mod:`gateway.parsing` and :mod:`routing`), so that the router
can name what the proxy reports (:class:`FinishedRequest`) without importing the proxy, and
the proxy can take a plan (:class:`ProxyPlan`) without importing the router.

Example::

    plan = ProxyPlan(kind=Kind.CHAT, body=b"{...}", headers={}, fields=fields, route=route,
                     decision=decision, started=time.perf_counter(), model_label="m",
                     route_header=None)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.parsing import Kind, RequestFields
from routing import Decision, RouteRequest

__all__ = [
    "FinishHook",
    "FinishedRequest",
    "ProxyPlan",
    "RequestObserver",
    "RouteHooks",
    "request_tokens",
]


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """What the proxy knows when a request is over (for metrics scrapers, limits, policies)."""

    request_id: str | None
    endpoint_id: str | None
    model: str
    adapter: str | None
    stream: bool
    status: int
    outcome: str  # ok | upstream_error | client_disconnect | gateway_error | gateway_shutdown
    duration_s: float
    ttft_s: float | None
    prompt_tokens_estimate: int
    usage: Mapping[str, Any] | None
    streamed_events: int = 0
    """SSE data events relayed (about one per token): what a cut stream consumed."""
    kind: Kind | None = None
    policy: str | None = None
    """The routing policy that ranked the engines."""
    key_id: str | None = None
    """The caller's key id (never the key): for the access log."""


def request_tokens(record: FinishedRequest) -> tuple[int, int]:
    """(prompt, completion) tokens of an answered request: the engine's usage when it sent
    one, else the gateway's prompt estimate and the SSE events relayed; (0, 0) when no
    engine's answer was relayed or the engine refused the request."""
    if record.endpoint_id is None or record.status >= 400:
        return 0, 0
    usage = record.usage or {}
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else record.prompt_tokens_estimate,
        completion if isinstance(completion, int) else record.streamed_events,
    )


class RequestObserver(Protocol):
    """Hook called once per proxied request, after its last byte (must not block)."""

    def on_request_finished(self, record: FinishedRequest) -> None: ...


class FinishHook(Protocol):
    """Called once when a request is over, however it ended (limits settle here)."""

    def finished(self, record: FinishedRequest) -> None: ...


class RouteHooks(Protocol):
    """Per-request routing hooks (:class:`gateway.router.Routed`); must not block."""

    def committed(self, endpoint_id: str, status: int) -> None:
        """An engine's response head is being relayed to the client (no failover after)."""

    def finished(self, record: FinishedRequest) -> None:
        """The request is over, however it ended (called exactly once)."""


@dataclass(frozen=True, slots=True)
class ProxyPlan:
    """Everything decided before the response starts."""

    kind: Kind
    body: bytes
    headers: Mapping[str, str]
    fields: RequestFields
    route: RouteRequest
    decision: Decision
    started: float
    model_label: str
    route_header: str | None
    hooks: RouteHooks | None = None
    response_headers: tuple[tuple[bytes, bytes], ...] = ()
    """Added to the response, whatever answers (rate-limit headers: ``x-ratelimit-*``)."""
    strip_usage: bool = False
    """The gateway injected ``include_usage``: hide the usage chunk from the client."""
    on_finish: FinishHook | None = None
    key_id: str | None = None
    """The caller's key id (never the key), for the access log."""
