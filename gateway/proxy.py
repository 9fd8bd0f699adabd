"""Forward one request to an engine and stream the answer back, byte for byte.

The route parses and routes (errors there are ordinary exceptions), then calls
:meth:`Proxy.serve`, which runs one :class:`Exchange`. Three things may end it early, and
each cancels the request's task with its reason: the client's ``http.disconnect`` (a
watcher task; the upstream connection is then closed, so the engine aborts the request and
frees its slot), the whole-request deadline (``total_timeout_s``, a loop timer) and the
shutdown drain (:class:`gateway.shutdown.InFlight`). These are asyncio's own primitives, not
anyio's: a task group and cancel scope per request cost ~40 us of CPU in
``benchmarks/overhead`` (scope entry looks up task state in a weak dict and schedules its
own timer); the gateway runs only on asyncio (uvloop).

Three objects, after starlette's middleware responders and httpx's ``_send_*`` chain:

* :class:`Proxy` -- one per app: the upstream client, the registry, metrics, settings;
* :class:`Exchange` -- one per request: the plan, the client's ``send``, and what reached
  the client so far (status, whether the head went out, SSE or not, the outcome). It walks
  ``decision.ranked`` and moves to the next engine only before the first byte reaches the
  client: on connect errors, connection resets, and retryable 5xx statuses. The first body
  chunk is read before the client sees any header, so an engine that dies right after
  accepting is still retried. After headers are sent, a failure ends an SSE stream with one
  ``data: {"error": ...}`` event (non-SSE bodies are cut). A failover spends the retry
  budget (:class:`gateway.outliers.RetryBudget`: when it is exhausted the last error is the
  answer), and each attempt's outcome before the commit (a 5xx, a connect error, a timeout,
  or an answer < 500) feeds its engine's outlier detector; ejected engines are skipped.
  Every request is accounted once:
  metrics, :class:`~gateway.exchange.RouteHooks`, :class:`~gateway.exchange.RequestObserver`;
* :class:`Attempt` -- one engine's try: its :class:`~gateway.endpoints.Lease` (in-flight
  counters, released however the attempt ends), the upstream response, and the relay:
  original bytes forwarded, chunks streamed as they arrive (no buffering, no per-chunk
  parsing beyond counting SSE events), upstream 4xx and the last upstream 5xx passed through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import aiohttp
from starlette.types import Receive, Send

from gateway.context import current_request_id
from gateway.endpoints import EndpointRegistry, EndpointState, Lease
from gateway.errors import (
    GatewayError,
    NoHealthyEndpoint,
    ShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    map_upstream_errors,
    send_error,
    sse_error_event,
)
from gateway.exchange import FinishedRequest, ProxyPlan, RequestObserver, request_tokens
from gateway.health import HealthChecker
from gateway.metrics import GatewayMetrics
from gateway.settings import ProxySettings
from gateway.shutdown import InFlight
from gateway.streamusage import UsageChunkFilter
from gateway.upstream import Upstream
from gateway.usage import BODY_BYTES, TAIL_BYTES, extract_usage, stream_completed
from routing.types import is_placement

log = logging.getLogger(__name__)

_DROP_RESPONSE_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
     b"server", b"date", b"x-request-id"}
)  # fmt: skip
CLIENT_CLOSED = 499
_TOKEN_MARKERS = re.compile(rb'"(?:content|text)":\s*"[^"]')
"""An SSE chunk carrying generated text (not the empty role delta engines may send first)."""
_KEEPALIVE = b": keep-alive\n\n"


def carries_token(chunk: bytes) -> bool:
    """True if ``chunk`` holds generated text: the first such chunk ends the prefill."""
    return _TOKEN_MARKERS.search(chunk) is not None


class Proxy:
    """Owns the forwarding logic; one per app, shared by all requests."""

    def __init__(
        self,
        *,
        upstream: Upstream,
        endpoints: EndpointRegistry,
        health: HealthChecker,
        metrics: GatewayMetrics,
        settings: ProxySettings,
        observers: Sequence[RequestObserver] = (),
        inflight: InFlight | None = None,
    ) -> None:
        self.upstream = upstream
        self.endpoints = endpoints
        self.health = health
        self.metrics = metrics
        self.settings = settings
        self.observers = tuple(observers)
        self.inflight = inflight if inflight is not None else InFlight()

    async def serve(self, plan: ProxyPlan, receive: Receive, send: Send) -> None:
        """Run the attempts and stream the answer; always accounts for the request."""
        await Exchange(self, plan, send).run(receive)

    def attempt_failed(self, state: EndpointState, exc: UpstreamError) -> None:
        self.metrics.upstream_errors.labels(endpoint=state.id, kind=type(exc).__name__).inc()
        if isinstance(exc, UpstreamUnavailable):
            self.health.apply(state, ok=False, error=exc.message)
        log.warning("engine %s failed: %s", state.id, exc.message)


class Exchange:
    """One proxied request: the attempts over the ranking and what reached the client."""

    __slots__ = (
        "endpoint_id",
        "events",
        "finished",
        "outcome",
        "plan",
        "proxy",
        "send",
        "sent_last",
        "sse",
        "started",
        "status",
        "ttft_s",
        "usage",
    )

    def __init__(self, proxy: Proxy, plan: ProxyPlan, send: Send) -> None:
        self.proxy = proxy
        self.plan = plan
        self.send = send
        self.status = 0
        self.started = False  # the response head went out: no failover from here on
        self.sent_last = False  # the final body message is going out: a disconnect is late
        self.finished = False  # the attempts are over: nothing may cancel the task any more
        self.sse = False
        self.outcome = "ok"
        self.endpoint_id: str | None = None
        self.ttft_s: float | None = None
        self.usage: Mapping[str, Any] | None = None
        self.events = 0  # SSE data events relayed

    async def run(self, receive: Receive) -> None:
        """The attempts, raced against the client's disconnect, under the deadline and the
        shutdown drain (see the module docstring); then the request is accounted, always."""
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        why: list[str] = []  # the first reason to cancel: gone | shutdown | deadline

        def cancel(reason: str) -> None:
            if not why and not self.finished:
                why.append(reason)
                task.cancel()

        async def watch_disconnect() -> None:
            with contextlib.suppress(Exception):  # a server that fails receive(): stop watching
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not self.sent_last:  # (servers report a finished response as gone)
                    cancel("gone")

        watcher = loop.create_task(watch_disconnect())
        timer = loop.call_later(proxy.settings.total_timeout_s, cancel, "deadline")
        token = proxy.inflight.add(partial(cancel, "shutdown"))
        try:
            try:
                await self._attempts()
            except GatewayError as exc:  # nothing was sent yet
                self.status, self.outcome = exc.status, "gateway_error"
                await self.send_error(exc)
            self.finished = True
        except asyncio.CancelledError:
            if not why:  # cancelled from outside (the server is stopping)
                self.status, self.outcome = CLIENT_CLOSED, "client_disconnect"
                raise
            task.uncancel()
            self.finished = True
            await self._cancelled(why[0])
        finally:
            self.finished = True
            timer.cancel()
            watcher.cancel()
            proxy.inflight.discard(token)
            self._account()

    async def _cancelled(self, reason: str) -> None:
        if reason == "gone":
            self.status, self.outcome = CLIENT_CLOSED, "client_disconnect"
        elif reason == "shutdown":
            await self._end(ShuttingDown("the gateway is shutting down; retry later"))
        else:
            deadline = self.proxy.settings.total_timeout_s
            await self._end(
                UpstreamTimeout(f"the request exceeded the gateway's {deadline:g}s deadline")
            )

    async def send_error(self, exc: GatewayError) -> None:
        self.sent_last = True
        await send_error(self.send, exc, self.plan.response_headers)

    async def _end(self, exc: GatewayError) -> None:
        """The deadline or the shutdown cut the exchange: an envelope if nothing was sent,
        else one SSE error event (a non-SSE body is left cut: the client sees it incomplete)."""
        shutdown = isinstance(exc, ShuttingDown)
        if not self.started:
            self.status = exc.status
            self.outcome = "gateway_shutdown" if shutdown else "gateway_error"
            await self.send_error(exc)
            return
        self.outcome = "gateway_shutdown" if shutdown else "upstream_error"
        if self.sse:
            await self.send({"type": "http.response.body", "body": sse_error_event(exc)})

    async def _attempts(self) -> None:
        plan, proxy, route = self.plan, self.proxy, self.plan.route
        ranked = plan.decision.ranked[: proxy.settings.max_attempts]
        last_exc: GatewayError = NoHealthyEndpoint("no engine could take the request")
        placed = is_placement(route, (s.id for s in plan.decision.ranked))
        budget = proxy.endpoints.outliers.budget  # failovers: a share of recent requests
        budget.request()
        for index, snap in enumerate(ranked):
            state = proxy.endpoints.get(snap.id)
            if state is None or not state.routable():  # removed or ejected since the decision
                continue
            if index:
                proxy.metrics.retries.labels(model=plan.model_label).inc()
            last = index == len(ranked) - 1
            lease = state.lease(
                prompt_tokens=route.prompt_tokens,
                max_tokens=route.max_tokens,
                cached_tokens=route.prefix_blocks.get(state.id, 0) * route.block_tokens,
                seq=route.seq,
                placed=placed,
            )
            attempt = Attempt(self, lease)
            with lease:
                try:
                    if not await attempt.open(last=last):
                        lease.failed()
                        continue  # a retryable status, and the budget allows a retry
                    first = await attempt.first_chunk()
                except UpstreamError as exc:
                    attempt.close()
                    lease.failed()
                    proxy.attempt_failed(state, exc)
                    if self.started:  # committed by keep-alive comments: end the stream
                        await self.end_stream(state, exc)
                        return
                    last_exc = exc
                    if exc.retryable and not last and budget.retry():
                        continue
                    raise
                if attempt.response is not None and attempt.response.status >= 500:
                    lease.failed()  # relayed as it is (the last engine, or no retry left)
                else:
                    lease.passed()
                try:
                    await attempt.relay(first)
                finally:
                    attempt.close()
                return
        raise last_exc

    async def start(self, attempt: Attempt) -> None:
        """Send the response head (status and headers); from here on we cannot fail over."""
        response, state = attempt.response, attempt.lease.state
        assert response is not None
        headers = [
            (k.lower(), v)
            for k, v in response.raw_headers
            if k.lower() not in _DROP_RESPONSE_HEADERS
        ]
        if attempt.sse:
            headers.append((b"x-accel-buffering", b"no"))
        if self.plan.response_headers:
            headers.extend(self.plan.response_headers)
        if self.plan.route_header is not None:
            headers.append(
                (b"x-switchyard-route", self.plan.route_header.encode("latin-1", "replace"))
            )
            headers.append((b"x-switchyard-endpoint", state.id.encode("latin-1", "replace")))
        await self.send(
            {"type": "http.response.start", "status": response.status, "headers": headers}
        )
        self.status, self.started, self.sse = response.status, True, attempt.sse
        self.endpoint_id = state.id
        if self.plan.hooks is not None:
            self.plan.hooks.committed(state.id, response.status)

    async def end_stream(self, state: EndpointState, exc: GatewayError) -> None:
        """A started response failed: one final SSE error event, no ``[DONE]``."""
        self.proxy.metrics.stream_errors.labels(endpoint=state.id).inc()
        self.outcome = "upstream_error"
        if self.sse:
            await self.send({"type": "http.response.body", "body": sse_error_event(exc)})
        # Non-SSE: return without finishing; the server closes the connection.

    def _account(self) -> None:
        plan, metrics = self.plan, self.proxy.metrics
        duration = time.perf_counter() - plan.started
        if self.outcome == "ok" and self.status >= 500:
            self.outcome = "upstream_error"
        record = FinishedRequest(
            request_id=current_request_id(),
            endpoint_id=self.endpoint_id,
            model=plan.route.model,
            adapter=plan.route.adapter,
            stream=plan.fields.stream,
            status=self.status,
            outcome=self.outcome,
            duration_s=duration,
            ttft_s=self.ttft_s,
            prompt_tokens_estimate=plan.route.prompt_tokens,
            usage=self.usage,
            streamed_events=self.events,
            kind=plan.kind,
            policy=plan.decision.policy,
            key_id=plan.key_id,
        )
        prompt_tokens, completion_tokens = request_tokens(record)
        metrics.request_done(
            model=plan.model_label,
            endpoint=self.endpoint_id or "none",
            status=self.status,
            duration_s=duration,
            ttft_s=self.ttft_s,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        for hook in (plan.hooks, plan.on_finish):
            if hook is not None:
                try:
                    hook.finished(record)
                except Exception:
                    log.exception("request hook %r failed", hook)
        for observer in self.proxy.observers:
            try:
                observer.on_request_finished(record)
            except Exception:
                log.exception("request observer %r failed", observer)


class Attempt:
    """One engine's try at the request: its lease, the upstream response, the relay."""

    __slots__ = ("complete", "exchange", "lease", "response", "sse")

    def __init__(self, exchange: Exchange, lease: Lease) -> None:
        self.exchange = exchange
        self.lease = lease
        self.response: aiohttp.ClientResponse | None = None
        self.sse = False
        self.complete = False  # the whole upstream body was read: the connection is reusable

    async def open(self, *, last: bool) -> bool:
        """Send the request; False when the engine answered a retryable status, another
        engine is left to try and the retry budget allows it (the response is dropped)."""
        plan, state = self.exchange.plan, self.lease.state
        proxy = self.exchange.proxy
        headers = (
            {**plan.headers, **state.upstream_headers} if state.upstream_headers else plan.headers
        )
        with map_upstream_errors(state.id):
            self.response = await proxy.upstream.post(
                state.url + plan.kind.value, plan.body, headers
            )
        status = self.response.status
        self.sse = self.response.headers.get("content-type", "").startswith("text/event-stream")
        retry = status in proxy.settings.retry_statuses and not last
        if retry and proxy.endpoints.outliers.budget.retry():
            proxy.metrics.upstream_errors.labels(endpoint=state.id, kind=f"http_{status}").inc()
            log.warning("engine %s answered %d; trying the next", state.id, status)
            self.close()
            return False
        return True

    async def first_chunk(self) -> bytes:
        """The first body chunk. A stream whose first token takes longer than
        ``sse_keepalive_s`` is committed to this engine: its head goes out, then an SSE
        comment (``: keep-alive``) every interval, so idle timeouts in front of us do not cut
        it. (aiohttp's ``readany`` may be cancelled without losing data.)"""
        response, exchange = self.response, self.exchange
        assert response is not None
        interval = exchange.proxy.settings.sse_keepalive_s
        with map_upstream_errors(self.lease.state.id):
            if not (interval > 0 and self.sse and response.status == 200):
                return await response.content.readany()
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        return await response.content.readany()
                # Still no first chunk after ``interval``: commit and keep the client waiting.
                if not exchange.started:
                    await exchange.start(self)
                await exchange.send({"type": "http.response.body", "body": _KEEPALIVE,
                                     "more_body": True})  # fmt: skip

    async def relay(self, first: bytes) -> None:
        """Commit to this engine: head, then every chunk as it comes, then accounting."""
        exchange, lease = self.exchange, self.lease
        response = self.response
        assert response is not None
        if self.sse and carries_token(first):
            # vLLM and enginesim may send an empty role delta before any token: the prefill
            # (queued work the prefix-cache cost model counts) ends with the first text.
            exchange.ttft_s = time.perf_counter() - exchange.plan.started
            lease.first_token(ttft_s=exchange.ttft_s)
        if not exchange.started:
            await exchange.start(self)
        strip = UsageChunkFilter() if self.sse and exchange.plan.strip_usage else None
        shown = first if strip is None else strip.feed(first)
        if shown:
            exchange.events += shown.count(b"data: {") if self.sse else 0
            await exchange.send({"type": "http.response.body", "body": shown, "more_body": True})
        try:
            with map_upstream_errors(lease.state.id):
                kept = await self._pump(first, strip)
        except UpstreamError as exc:
            exchange.proxy.attempt_failed(lease.state, exc)
            await exchange.end_stream(lease.state, exc)
            return
        self.complete = True
        ok = response.status == 200
        if self.sse and ok and not stream_completed(kept):
            cut = UpstreamError(f"engine {lease.state.id} ended the stream without [DONE]")
            await exchange.end_stream(lease.state, cut)
            return
        exchange.sent_last = True
        await exchange.send({"type": "http.response.body", "body": b""})
        if ok and (self.sse or len(kept) <= BODY_BYTES):
            exchange.usage = extract_usage(kept, sse=self.sse)
            completion = (exchange.usage or {}).get("completion_tokens")
            if not self.sse and isinstance(completion, int):
                lease.tokens(n=completion)

    async def _pump(self, first: bytes, strip: UsageChunkFilter | None = None) -> bytes:
        """Forward the remaining chunks unchanged (an SSE stream whose usage chunk the gateway
        injected goes through ``strip``); returns the bounded tail (SSE, as the engine sent
        it, usage included) or body."""
        response, exchange, lease = self.response, self.exchange, self.lease
        assert response is not None
        send, read = exchange.send, response.content.readany
        keep = bytearray(first)
        if not self.sse:
            while chunk := await read():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if len(keep) <= BODY_BYTES:
                    keep += chunk
            return bytes(keep)
        started = exchange.plan.started
        last = time.perf_counter()
        while chunk := await read():
            shown = chunk if strip is None else strip.feed(chunk)
            if shown:
                await send({"type": "http.response.body", "body": shown, "more_body": True})
            now = time.perf_counter()
            if not lease.first_token_seen and carries_token(chunk):
                exchange.ttft_s = now - started
                lease.first_token(ttft_s=exchange.ttft_s)
            n = shown.count(b"data: {")
            exchange.events += n
            lease.tokens(n=n, itl_s=now - last)
            last = now
            keep += chunk
            if len(keep) > TAIL_BYTES:
                del keep[: len(keep) - TAIL_BYTES]
        rest = strip.flush() if strip is not None else b""
        if rest:
            await send({"type": "http.response.body", "body": rest, "more_body": True})
        return bytes(keep)

    def close(self) -> None:
        """Return the connection to the pool if its body was read whole, else drop it (the
        engine sees the disconnect and aborts). Synchronous, so a cancelled attempt closes too."""
        response, self.response = self.response, None
        if response is None:
            return
        if self.complete:
            response.release()
        else:
            response.close()
