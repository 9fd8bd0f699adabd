"""Pure-ASGI middleware: request id, body-size limit, access log.

Pure ASGI (not ``BaseHTTPMiddleware``) so that contextvars set here are visible in the
handler, streaming is never buffered and ``http.disconnect`` reaches the proxy unchanged.
Order, outermost first: :class:`RequestIdMiddleware` → the proxied routes (raw ASGI; they
apply the :class:`ConcurrencyGuard` and the body limit themselves, one await level each fewer
on the hot path, and write their own access line) → :class:`AccessLogMiddleware` →
:class:`ConcurrencyLimitMiddleware` → :class:`BodySizeLimitMiddleware` → the FastAPI app.
Both paths share one guard.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import reset_request_id, set_request_id
from gateway.errors import BodyTooLarge, GatewayError, Overloaded, send_error

log = logging.getLogger("switchyard.access")  # gateway.accesslog.ACCESS_LOGGER

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


class RequestIdMiddleware:
    """Takes a safe incoming ``x-request-id`` or makes one; echoes it on the response.

    Made ids are ``req_<16 random hex digits, per process><counter in hex>``: unique across
    processes and replicas without a ``uuid4`` (an ``os.urandom`` call) per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._prefix = f"req_{secrets.token_hex(8)}"
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        text = incoming.decode("latin-1") if incoming else ""
        rid = text if _SAFE_ID.match(text) else f"{self._prefix}{next(self._ids):08x}"
        raw = rid.encode()
        started = False

        async def send_with_id(message: Message) -> None:
            # One wrapper: body messages (every streamed chunk) pass with one type check.
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", raw))
                message["headers"] = headers
            await send(message)

        token = set_request_id(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug, not a client error: answer 500 in the usual envelope, then let the
            # server log the traceback.
            if not started:
                await send_error(send_with_id, GatewayError("internal gateway error"))
            raise
        finally:
            reset_request_id(token)


def declared_too_large(declared: bytes | None, limit: int) -> BodyTooLarge | None:
    """The 413 for a ``content-length`` header value over ``limit``, else None."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return BodyTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
    return None


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body (413 once it exceeds ``limit``); None if the client left."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodySizeLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413: by Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        refused = declared_too_large(_header(scope, b"content-length"), limit)
        if refused is not None:
            await send_error(send, refused)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class ConcurrencyGuard:
    """At most ``max_requests`` requests in progress, counted by whoever serves them (one
    event loop: a plain counter is enough). ``with guard:`` raises :class:`Overloaded`."""

    __slots__ = ("active", "max_requests")

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.active = 0

    def __enter__(self) -> ConcurrencyGuard:
        if self.active >= self.max_requests:
            raise Overloaded(f"the gateway is at its limit of {self.max_requests} requests")
        self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.active -= 1


class ConcurrencyLimitMiddleware:
    """Applies a :class:`ConcurrencyGuard`: over the limit, a 503 envelope at once.

    Probes (``/health``, ``/ready``, ``/metrics``) are exempt so that an overloaded gateway
    still answers its orchestrator.
    """

    EXEMPT = frozenset({"/health", "/ready", "/metrics"})

    def __init__(self, app: ASGIApp, *, guard: ConcurrencyGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.EXEMPT:
            await self.app(scope, receive, send)
            return
        try:
            self.guard.__enter__()
        except Overloaded as exc:
            await send_error(send, exc)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.guard.__exit__()


class AccessLogMiddleware:
    """One access line per request to the FastAPI routes (ops, admin, models): method, path,
    status, duration, request id (from the log context). Probes (``/health``, ``/ready``,
    ``/metrics``) are logged at DEBUG. Proxied requests are logged by
    :class:`gateway.accesslog.AccessLog` with what the proxy knows (this middleware sits
    behind the proxied routes: it adds no wrapper to their streamed chunks)."""

    PROBES = frozenset({"/health", "/ready", "/metrics"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_tracking(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        finally:
            path = scope.get("path", "-")
            level = logging.DEBUG if path in self.PROBES else logging.INFO
            if log.isEnabledFor(level):
                method = scope.get("method", "-")
                duration = time.perf_counter() - start
                fields = {"method": method, "path": path, "status": status,
                          "duration_s": round(duration, 6)}  # fmt: skip
                log.log(level, "%s %s %d", method, path, status, extra={"access": fields})
