"""Every error the gateway itself makes, as one hierarchy, rendered as the OpenAI envelope.

::

    GatewayError (500 server_error)
    ├── Overloaded                  503  code=server_is_overloaded  (concurrency guard, shed
    │   │                                                            from the admission queue)
    │   ├── ShuttingDown            503  code=shutting_down         (drain after Ctrl-C)
    │   ├── AdapterUnavailable      503  code=adapter_unavailable   (no engine has a free
    │   │                                                            LoRA slot for it now)
    │   └── AdapterLoadTimeout      503  code=adapter_load_timeout  (its on-demand load took
    │                                                                 over lora.load_timeout_s)
    ├── AdapterLoadFailed           502  code=adapter_load_failed   (a LoRA load: the engine's
    │                                                                 5xx, no connection)
    ├── KeyStoreUnavailable         503  code=key_store_unavailable (an admin key change
    │                                                                 while Redis is down)
    ├── NotReady                    503  code=not_ready             (``/ready`` before
    │                                                                 discovery's first list)
    ├── ClientError (400 invalid_request_error)
    │   ├── InvalidJSON             400  code=invalid_json
    │   ├── InvalidField            400  code=invalid_value, param set
    │   ├── Unauthorized            401  code=invalid_api_key
    │   ├── PermissionDenied        403  code=permission_denied  (a client key on the admin API)
    │   ├── NotFound                404  code=not_found          (unknown route/engine id)
    │   ├── ModelNotFound           404  code=model_not_found
    │   ├── MethodNotAllowed        405  code=method_not_allowed
    │   ├── AdapterRejected         4xx  code=adapter_load_rejected (the engine's own 4xx and
    │   │                                                            message for a LoRA load)
    │   ├── BodyTooLarge            413  code=request_too_large
    │   └── RateLimited             429  type=rate_limit_error code=rate_limit_exceeded
    │                                    (retry-after, retry-after-ms, x-ratelimit-*, and
    │                                    x-should-retry: false when waiting cannot help)
    └── UpstreamError (502 server_error)
        ├── UpstreamUnavailable     502  code=upstream_unavailable   (connect refused/reset)
        ├── UpstreamProtocolError   502  code=bad_upstream_response
        ├── UpstreamTimeout         504  code=upstream_timeout
        └── NoHealthyEndpoint       503  code=no_healthy_endpoint

Upstream 4xx (and the last upstream 5xx after failover) are passed through unchanged; only
the gateway's own failures use these classes. The request path's client errors (aiohttp, see
:mod:`gateway.upstream`) are translated in exactly one place, :func:`map_upstream_errors`;
:func:`send_error` writes any of these as a raw ASGI response. After SSE headers are sent,
:func:`sse_error_event` renders the one final ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import aiohttp
import orjson

from gateway.context import current_request_id


class GatewayError(Exception):
    """Base of every gateway-made error; carries what the envelope needs."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # True when nothing reached the engine or the engine refused: safe to try another.
        self.retryable = retryable

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return envelope(self.message, type_=self.type, code=self.code, param=self.param)

    def headers(self) -> dict[str, str]:
        return {}


class Overloaded(GatewayError):
    status = 503
    type = "service_unavailable_error"
    code = "server_is_overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return retry_after_headers(self.retry_after_s)


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up, at least 1) and the exact ``retry-after-ms``
    (the openai SDK reads the latter first)."""
    ms = max(1, math.ceil(seconds * 1000.0))
    return {"retry-after": str(max(1, math.ceil(ms / 1000.0))), "retry-after-ms": str(ms)}


class ShuttingDown(Overloaded):
    code = "shutting_down"


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(ClientError):
    code = "invalid_json"


class InvalidField(ClientError):
    code = "invalid_value"


class Unauthorized(ClientError):
    status = 401
    code = "invalid_api_key"


class PermissionDenied(ClientError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class ModelNotFound(ClientError):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class AdapterRejected(ClientError):
    """An engine refused to load a LoRA adapter with a 4xx: that status and its message are
    passed through (the status is per instance: whatever the engine said, 400 to 499)."""

    code = "adapter_load_rejected"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, param="model")
        vars(self)["status"] = status if 400 <= status < 500 else 400


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"

    def headers(self) -> dict[str, str]:
        return {"allow": "POST"}


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class RateLimited(ClientError):
    """429 with the limiter's headers (computed by :mod:`gateway.ratelimit`): ``retry-after``,
    ``retry-after-ms``, the ``x-ratelimit-*`` set and ``x-should-retry``."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, headers: dict[str, str]) -> None:
        super().__init__(message)
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return self._headers


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "bad_gateway"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamProtocolError(UpstreamError):
    code = "bad_upstream_response"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class AdapterLoadFailed(GatewayError):
    """A LoRA load failed on the engine's side (not a proxied attempt: no failover)."""

    status = 502
    code = "adapter_load_failed"


class AdapterUnavailable(Overloaded):
    code = "adapter_unavailable"


class AdapterLoadTimeout(Overloaded):
    code = "adapter_load_timeout"


class _Unavailable503(GatewayError):
    """503 ``service_unavailable_error`` with ``retry-after`` of one second (a mixin)."""

    status = 503
    type = "service_unavailable_error"

    def headers(self) -> dict[str, str]:
        return retry_after_headers(1.0)


class NoHealthyEndpoint(_Unavailable503, UpstreamError):
    code = "no_healthy_endpoint"


class KeyStoreUnavailable(_Unavailable503):
    """503: the shared key store (Redis) cannot take an admin change right now."""

    code = "key_store_unavailable"


class NotReady(_Unavailable503):
    """503 from ``/ready``: this replica has not finished starting (it does not know its
    engine pool yet)."""

    code = "not_ready"


def envelope(
    message: str, *, type_: str, code: str | None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    """The OpenAI error body ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(exc: GatewayError) -> bytes:
    return orjson.dumps(exc.envelope())


def error_headers(
    exc: GatewayError, extra: Sequence[tuple[bytes, bytes]] = ()
) -> list[tuple[bytes, bytes]]:
    """Raw ASGI headers for an error response, ``x-request-id`` and ``extra`` included."""
    body_len = len(error_body(exc))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(body_len).encode()),
    ]
    own = exc.headers()
    headers += [(k.encode(), v.encode()) for k, v in own.items()]
    headers += [(k, v) for k, v in extra if k.decode("latin-1") not in own]
    rid = current_request_id()
    if rid:
        headers.append((b"x-request-id", rid.encode()))
    return headers


def sse_error_event(exc: GatewayError) -> bytes:
    """The single event that ends a stream which failed after its headers were sent."""
    return b"data: " + error_body(exc) + b"\n\n"


async def send_error(
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    exc: GatewayError,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer ``exc`` as a whole raw ASGI response (head and body), with ``extra`` headers."""
    headers = error_headers(exc, extra)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": error_body(exc)})


@contextmanager
def map_upstream_errors(endpoint_id: str) -> Iterator[None]:
    """Translate the upstream client's exceptions into :class:`UpstreamError` (the one place).

    Retryable (nothing reached the engine, or it dropped the connection before answering):
    connect and pool timeouts, refused or reset connections. A read timeout is not: the
    engine may be working on the request.
    """
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise UpstreamTimeout(
            f"engine {endpoint_id} did not accept the request in time (connect timeout)",
            retryable=True,
        ) from exc
    except TimeoutError as exc:  # aiohttp's SocketTimeoutError (sock_read) and total timeout
        raise UpstreamTimeout(f"engine {endpoint_id} timed out ({type(exc).__name__})") from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnavailable(
            f"engine {endpoint_id} unreachable ({type(exc).__name__})", retryable=True
        ) from exc
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamUnavailable(
            f"engine {endpoint_id} closed the connection ({type(exc).__name__})", retryable=True
        ) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamProtocolError(f"engine {endpoint_id} failed: {type(exc).__name__}") from exc
