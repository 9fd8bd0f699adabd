"""The app factory: ``create_app(settings, *, services=None)``.

The app is a stack of pure-ASGI layers, outermost first: request id and access log
(:mod:`gateway.middleware`), then :class:`gateway.routes.proxied.ProxiedRoutes` (chat,
completions and embeddings as raw ASGI, the hot path, applying the concurrency guard and
body limit itself), then for everything else the guard and body-limit middleware and a
FastAPI app (models, probes, metrics, admin). FastAPI's lifespan opens a
:class:`gateway.services.Services` (unless the caller passes one, as tests do) and exposes
it as lifespan state (``scope["state"]["services"]``).
Exception handlers turn every error into the OpenAI envelope.

Example::

    app = create_app(Settings.load("switchyard.yaml"))
    uvicorn.run(app)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp

from gateway.errors import ClientError, GatewayError, InvalidField, NotFound
from gateway.middleware import (
    AccessLogMiddleware,
    BodySizeLimitMiddleware,
    ConcurrencyGuard,
    ConcurrencyLimitMiddleware,
    RequestIdMiddleware,
)
from gateway.responses import error_response
from gateway.routes import adapters, admin, keys, openai, ops
from gateway.routes.proxied import ProxiedRoutes
from gateway.services import Services
from gateway.settings import Settings
from gateway.shutdown import InFlight

log = logging.getLogger(__name__)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    param = ".".join(loc) or None
    return error_response(InvalidField(f"{param}: {message}" if param else message, param=param))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"no route for {request.method} {request.url.path}"))
    err = ClientError(str(exc.detail))
    response = error_response(err)
    response.status_code = exc.status_code
    return response


async def _internal_error(request: Request, exc: Exception) -> Response:
    # A bug, not a client error: the usual envelope (the server logs the traceback).
    return error_response(GatewayError("internal gateway error"))


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client left while sending its body; nobody will read this answer.
    return Response(status_code=499)


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    config_path: Path | None = None,
    inflight: InFlight | None = None,
) -> ASGIApp:
    """Build the gateway app; pass ``services`` to use an already-open container, and
    ``inflight`` to let the caller end in-flight requests cleanly on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Services]]:
        if services is not None:
            try:
                yield {"services": services}
            finally:  # its sessions were opened on this loop
                await services.aclose()
            return
        async with Services.open(settings, config_path=config_path, inflight=inflight) as opened:
            yield {"services": opened}

    api = FastAPI(
        title="Switchyard",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        exception_handlers={
            Exception: _internal_error,
            GatewayError: _gateway_error,
            RequestValidationError: _validation_error,
            StarletteHTTPException: _http_error,
            ClientDisconnect: _client_gone,
        },
    )
    api.include_router(openai.router)
    api.include_router(ops.router)
    api.include_router(admin.router)
    api.include_router(keys.router)
    api.include_router(adapters.router)
    server = settings.server
    guard = ConcurrencyGuard(server.max_concurrent_requests)
    app: ASGIApp = BodySizeLimitMiddleware(api, max_bytes=server.max_body_bytes)
    app = ConcurrencyLimitMiddleware(app, guard=guard)
    if server.access_log:  # the FastAPI routes; proxied ones: gateway.accesslog.AccessLog
        app = AccessLogMiddleware(app)
    app = ProxiedRoutes(app, guard=guard, max_body_bytes=server.max_body_bytes)
    return RequestIdMiddleware(app)
