"""The FastAPI app of one simulated engine: routes, vLLM error envelope, in-flight counter."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from enginesim.server.admin_routes import build_admin_router
from enginesim.server.errors import install_error_handlers
from enginesim.server.openai_routes import build_openai_router
from enginesim.server.runtime import EngineRuntime

__all__ = ["create_engine_app"]


class _InflightCounter:
    """Pure-ASGI middleware: counts in-flight ``/v1/`` requests for vLLM's ``GET /load``."""

    def __init__(self, app: ASGIApp, rt: EngineRuntime) -> None:
        self.app = app
        self.rt = rt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        self.rt.http_inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.rt.http_inflight -= 1


def create_engine_app(rt: EngineRuntime) -> FastAPI:
    """One engine's ASGI app.

    >>> app = create_engine_app(runtime)  # serve with uvicorn
    """
    app = FastAPI(
        title=f"enginesim {rt.spec.served_model_name}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    app.include_router(build_openai_router(rt))
    app.include_router(build_admin_router(rt))
    app.add_middleware(_InflightCounter, rt=rt)
    return app
