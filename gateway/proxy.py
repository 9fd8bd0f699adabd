"""Forward one request to an engine and stream the answer back, byte for byte.

The route handler parses and routes (errors there are ordinary exceptions); it then returns a
:class:`ProxyResponse`, a raw ASGI app that:

* races the upstream exchange against the client's ``http.disconnect`` (a disconnect cancels
  the upstream request and closes its connection, so the engine aborts and frees the slot);
* walks ``decision.ranked`` and moves to the next engine only before the first byte reaches
  the client: on connect errors, connection resets, and retryable 5xx statuses. The first
  body chunk is read from the engine before the client sees any header, so an engine that
  dies right after accepting is still retried;
* forwards the original body bytes and streams upstream chunks with ``aiter_raw`` as they
  arrive (no buffering); upstream 4xx and the last upstream 5xx pass through unchanged;
* after headers are sent, a failure ends an SSE stream with one ``data: {"error": ...}``
  event (non-SSE bodies are cut, so the client sees an incomplete response);
* holds an in-flight lease on the engine for exactly the lifetime of the attempt, and reports
  every finished request to metrics and :class:`RequestObserver` hooks.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.context import current_request_id
from gateway.endpoints import EndpointRegistry, EndpointState
from gateway.errors import (
    GatewayError,
    NoHealthyEndpoint,
    ShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
    error_headers,
    map_upstream_errors,
    sse_error_event,
)
from gateway.health import HealthChecker
from gateway.metrics import GatewayMetrics
from gateway.parsing import Kind, RequestFields
from gateway.settings import ProxySettings
from gateway.shutdown import InFlight
from gateway.usage import BODY_BYTES, TAIL_BYTES, extract_usage, stream_completed
from routing import Decision, RouteRequest
from routing.state import Ticket
from routing.types import is_placement

log = logging.getLogger(__name__)

_DROP_RESPONSE_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
     b"server", b"date", b"x-request-id"}
)  # fmt: skip
_FORWARD_REQUEST_HEADERS = ("content-type", "accept", "user-agent")
CLIENT_CLOSED = 499
_TOKEN_MARKERS = re.compile(rb'"(?:content|text)":\s*"[^"]')
"""An SSE chunk carrying generated text (not the empty role delta engines may send first)."""


def carries_token(chunk: bytes) -> bool:
    """True if ``chunk`` holds generated text: the first such chunk ends the prefill."""
    return _TOKEN_MARKERS.search(chunk) is not None


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


class RequestObserver(Protocol):
    """Hook called once per proxied request, after its last byte (must not block)."""

    def on_request_finished(self, record: FinishedRequest) -> None: ...


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


@dataclass(slots=True)
class _Outcome:
    status: int = 0
    started: bool = False
    sse: bool = False
    outcome: str = "ok"
    endpoint_id: str | None = None
    ttft_s: float | None = None
    usage: Mapping[str, Any] | None = None


class Proxy:
    """Owns the forwarding logic; one per app, shared by all requests."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        endpoints: EndpointRegistry,
        health: HealthChecker,
        metrics: GatewayMetrics,
        settings: ProxySettings,
        observers: Sequence[RequestObserver] = (),
        inflight: InFlight | None = None,
    ) -> None:
        self._client = client
        self._endpoints = endpoints
        self._health = health
        self._metrics = metrics
        self._settings = settings
        self._observers = tuple(observers)
        self._inflight = inflight if inflight is not None else InFlight()

    def response(self, plan: ProxyPlan) -> ProxyResponse:
        return ProxyResponse(self, plan)

    async def serve(self, plan: ProxyPlan, send: Send) -> None:
        """Run the attempts and stream the answer; always accounts for the request."""
        out = _Outcome()
        try:
            with self._inflight.track() as scope:
                with scope:
                    await self._guarded(plan, send, out)
                if scope.cancelled_caught:  # the gateway is shutting down
                    await self._end_for_shutdown(send, out)
        except anyio.get_cancelled_exc_class():
            out.status, out.outcome = CLIENT_CLOSED, "client_disconnect"
            raise
        finally:
            self._account(plan, out)

    async def _guarded(self, plan: ProxyPlan, send: Send, out: _Outcome) -> None:
        """The attempts under the whole-request deadline; gateway errors become envelopes."""
        deadline = self._settings.total_timeout_s
        try:
            try:
                with anyio.fail_after(deadline):
                    await self._attempts(plan, send, out)
            except TimeoutError:
                late = UpstreamTimeout(f"the request exceeded the gateway's {deadline:g}s deadline")
                if not out.started:
                    raise late from None
                out.outcome = "upstream_error"
                if out.sse:  # else: the body is cut and the client sees an incomplete response
                    await send({"type": "http.response.body", "body": sse_error_event(late)})
        except GatewayError as exc:  # nothing was sent yet
            out.status, out.outcome = exc.status, "gateway_error"
            await send({"type": "http.response.start", "status": exc.status,
                        "headers": error_headers(exc)})  # fmt: skip
            await send({"type": "http.response.body", "body": error_body(exc)})

    async def _end_for_shutdown(self, send: Send, out: _Outcome) -> None:
        exc = ShuttingDown("the gateway is shutting down; retry on another replica or later")
        out.outcome = "gateway_shutdown"
        if not out.started:
            out.status = exc.status
            await send({"type": "http.response.start", "status": exc.status,
                        "headers": error_headers(exc)})  # fmt: skip
            await send({"type": "http.response.body", "body": error_body(exc)})
        elif out.sse:
            await send({"type": "http.response.body", "body": sse_error_event(exc)})
        # Non-SSE after the head: return without finishing; the server closes the connection.

    async def _attempts(self, plan: ProxyPlan, send: Send, out: _Outcome) -> None:
        ranked = plan.decision.ranked[: self._settings.max_attempts]
        last_exc: GatewayError = NoHealthyEndpoint("no engine could take the request")
        placed = is_placement(plan.route, (s.id for s in plan.decision.ranked))
        for index, snap in enumerate(ranked):
            state = self._endpoints.get(snap.id)
            if state is None:  # removed since the decision
                continue
            if index:
                self._metrics.retries.labels(model=plan.model_label).inc()
            is_last = index == len(ranked) - 1
            async with AsyncExitStack() as stack:
                ticket = stack.enter_context(
                    self._endpoints.lease(
                        state,
                        prompt_tokens=plan.route.prompt_tokens,
                        max_tokens=plan.route.max_tokens,
                        cached_tokens=plan.route.prefix_blocks.get(state.id, 0)
                        * plan.route.block_tokens,
                        seq=plan.route.seq,
                        placed=placed,
                    )
                )
                try:
                    upstream, chunks = await self._open(plan, state, stack)
                    if upstream.status_code in self._settings.retry_statuses and not is_last:
                        self._metrics.upstream_errors.labels(
                            endpoint=state.id, kind=f"http_{upstream.status_code}"
                        ).inc()
                        log.warning("engine %s answered %d; trying the next", state.id,
                                    upstream.status_code)  # fmt: skip
                        continue
                    first = await self._first_chunk(plan, state, upstream, chunks, send, out)
                except UpstreamError as exc:
                    self._attempt_failed(state, exc)
                    if out.started:  # committed by keep-alive comments: end the stream
                        await self._end_stream(state, exc, send, out)
                        return
                    last_exc = exc
                    if exc.retryable and not is_last:
                        continue
                    raise
                await self._relay(plan, state, ticket, upstream, chunks, first, send, out)
                return
        raise last_exc

    async def _open(
        self, plan: ProxyPlan, state: EndpointState, stack: AsyncExitStack
    ) -> tuple[httpx.Response, AsyncIterator[bytes]]:
        headers = (
            {**plan.headers, **state.upstream_headers} if state.upstream_headers else plan.headers
        )
        request = self._client.build_request(
            "POST", state.url + plan.kind.value, content=plan.body, headers=headers
        )
        with map_upstream_errors(state.id):
            upstream = await self._client.send(request, stream=True)
        stack.push_async_callback(_close_quietly, upstream)
        return upstream, upstream.aiter_raw()

    async def _first_chunk(
        self,
        plan: ProxyPlan,
        state: EndpointState,
        upstream: httpx.Response,
        chunks: AsyncIterator[bytes],
        send: Send,
        out: _Outcome,
    ) -> bytes:
        """The first body chunk. A stream whose first token takes longer than
        ``sse_keepalive_s`` is committed to this engine: its headers go out with SSE comments
        (``: keep-alive``) every interval, so idle timeouts in front of us do not cut it."""
        interval = self._settings.sse_keepalive_s
        with map_upstream_errors(state.id):
            if not (interval > 0 and upstream.status_code == 200 and _is_sse(upstream)):
                return await _first_nonempty(chunks)
            box: list[bytes | Exception] = []
            done = anyio.Event()

            async def read() -> None:
                try:
                    box.append(await _first_nonempty(chunks))
                except Exception as exc:  # re-raised below, in this task
                    box.append(exc)
                finally:
                    done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                while not done.is_set():
                    with anyio.move_on_after(interval):
                        await done.wait()
                    if done.is_set():
                        break
                    if not out.started:
                        out.endpoint_id = state.id
                        await self._start(plan, state, upstream, send, out)
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n",
                                "more_body": True})  # fmt: skip
            if isinstance(box[0], Exception):
                raise box[0]
            return box[0]

    def _attempt_failed(self, state: EndpointState, exc: UpstreamError) -> None:
        self._metrics.upstream_errors.labels(endpoint=state.id, kind=type(exc).__name__).inc()
        if isinstance(exc, UpstreamUnavailable):
            self._health.apply(state, ok=False, error=exc.message)
        log.warning("engine %s failed: %s", state.id, exc.message)

    async def _end_stream(
        self, state: EndpointState, exc: GatewayError, send: Send, out: _Outcome
    ) -> None:
        """A started SSE response failed: one final error event, no ``[DONE]``."""
        self._metrics.stream_errors.labels(endpoint=state.id).inc()
        out.outcome = "upstream_error"
        if out.sse:
            await send({"type": "http.response.body", "body": sse_error_event(exc)})
        # Non-SSE: return without finishing; the server closes the connection.

    async def _start(
        self,
        plan: ProxyPlan,
        state: EndpointState,
        upstream: httpx.Response,
        send: Send,
        out: _Outcome,
    ) -> None:
        """Send the response head (status and headers); from here on we cannot fail over."""
        sse = _is_sse(upstream)
        headers = _response_headers(plan, state, upstream, sse=sse)
        await send({"type": "http.response.start", "status": upstream.status_code,
                    "headers": headers})  # fmt: skip
        out.status, out.started, out.sse = upstream.status_code, True, sse
        if plan.hooks is not None:
            plan.hooks.committed(state.id, upstream.status_code)

    async def _relay(
        self,
        plan: ProxyPlan,
        state: EndpointState,
        ticket: Ticket,
        upstream: httpx.Response,
        chunks: AsyncIterator[bytes],
        first: bytes,
        send: Send,
        out: _Outcome,
    ) -> None:
        """Commit to this engine: head, then every chunk as it comes, then accounting."""
        out.endpoint_id = state.id
        sse = _is_sse(upstream)
        if sse and carries_token(first):
            # vLLM and enginesim may send an empty role delta before any token: the prefill
            # (queued work the prefix-cache cost model counts) ends with the first text.
            out.ttft_s = time.perf_counter() - plan.started
            state.engine.first_token(ticket, ttft_s=out.ttft_s)
        if not out.started:
            await self._start(plan, state, upstream, send, out)
        if first:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        try:
            kept = await self._pump(
                state, ticket, chunks, send, first=first, sse=sse, plan=plan, out=out
            )
        except UpstreamError as exc:
            self._attempt_failed(state, exc)
            await self._end_stream(state, exc, send, out)
            return
        if sse and upstream.status_code == 200 and not stream_completed(kept):
            cut = UpstreamError(f"engine {state.id} ended the stream without [DONE]")
            await self._end_stream(state, cut, send, out)
            return
        await send({"type": "http.response.body", "body": b""})
        if upstream.status_code == 200 and (sse or len(kept) <= BODY_BYTES):
            out.usage = extract_usage(kept, sse=sse)
            completion = (out.usage or {}).get("completion_tokens")
            if not sse and isinstance(completion, int):
                state.engine.tokens(ticket, n=completion)

    async def _pump(
        self,
        state: EndpointState,
        ticket: Ticket,
        chunks: AsyncIterator[bytes],
        send: Send,
        *,
        first: bytes,
        sse: bool,
        plan: ProxyPlan,
        out: _Outcome,
    ) -> bytes:
        """Forward the remaining chunks unchanged; returns the bounded tail (SSE) or body."""
        keep = bytearray(first)
        limit = TAIL_BYTES if sse else BODY_BYTES
        last = time.perf_counter()
        with map_upstream_errors(state.id):
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if sse:
                    now = time.perf_counter()
                    if not ticket.started and carries_token(chunk):
                        out.ttft_s = now - plan.started
                        state.engine.first_token(ticket, ttft_s=out.ttft_s)
                    state.engine.tokens(ticket, n=chunk.count(b"data: {"), itl_s=now - last)
                    last = now
                    keep += chunk
                    if len(keep) > limit:
                        del keep[: len(keep) - limit]
                elif len(keep) <= limit:
                    keep += chunk
        return bytes(keep)

    def _account(self, plan: ProxyPlan, out: _Outcome) -> None:
        duration = time.perf_counter() - plan.started
        endpoint = out.endpoint_id or "none"
        labels = {"model": plan.model_label, "endpoint": endpoint}
        self._metrics.requests.labels(**labels, status=str(out.status)).inc()
        self._metrics.latency.labels(**labels).observe(duration)
        if out.ttft_s is not None:
            self._metrics.ttft.labels(**labels).observe(out.ttft_s)
        if out.outcome == "ok" and out.status >= 500:
            out.outcome = "upstream_error"
        record = FinishedRequest(
            request_id=current_request_id(),
            endpoint_id=out.endpoint_id,
            model=plan.route.model,
            adapter=plan.route.adapter,
            stream=plan.fields.stream,
            status=out.status,
            outcome=out.outcome,
            duration_s=duration,
            ttft_s=out.ttft_s,
            prompt_tokens_estimate=plan.route.prompt_tokens,
            usage=out.usage,
        )
        hooks = (plan.hooks,) if plan.hooks is not None else ()
        for hook in hooks:
            try:
                hook.finished(record)
            except Exception:
                log.exception("routing hook failed")
        for observer in self._observers:
            try:
                observer.on_request_finished(record)
            except Exception:
                log.exception("request observer %r failed", observer)


def _is_sse(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("text/event-stream")


async def _first_nonempty(chunks: AsyncIterator[bytes]) -> bytes:
    async for chunk in chunks:
        if chunk:
            return chunk
    return b""


def _response_headers(
    plan: ProxyPlan, state: EndpointState, upstream: httpx.Response, *, sse: bool
) -> list[tuple[bytes, bytes]]:
    """The engine's headers minus hop-by-hop ones, plus ours (debug route, no buffering)."""
    drop = _DROP_RESPONSE_HEADERS
    headers = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower() not in drop]
    if sse:
        headers.append((b"x-accel-buffering", b"no"))
    if plan.route_header is not None:
        headers.append((b"x-switchyard-route", plan.route_header.encode("latin-1", "replace")))
        headers.append((b"x-switchyard-endpoint", state.id.encode("latin-1", "replace")))
    return headers


class ProxyResponse(Response):
    """A raw ASGI response running :meth:`Proxy.serve`, cancelled by ``http.disconnect``."""

    def __init__(self, proxy: Proxy, plan: ProxyPlan) -> None:
        super().__init__()
        self._proxy = proxy
        self._plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            await self._proxy.serve(self._plan, send)
            tg.cancel_scope.cancel()


async def _close_quietly(response: httpx.Response) -> None:
    # Shielded: closing must finish even when the request was cancelled by a disconnect,
    # so the connection is dropped (engine aborts) or returned to the pool.
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await response.aclose()
