"""A uvicorn server for embedding in an application's own event loop and task group.

Shared by :mod:`enginesim.cluster` (one per simulated engine) and :mod:`enginesim.kube.server`
(the emulated Kubernetes API): no signal handling, no lifespan, no websockets, no access log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

__all__ = ["EmbeddedServer", "embedded_server"]


class EmbeddedServer(uvicorn.Server):
    """uvicorn without signal handling: the embedding application owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn releases
        return None


def embedded_server(
    app: Starlette, *, host: str, port: int, log_level: str, limit_concurrency: int
) -> EmbeddedServer:
    """``app`` on ``host:port`` (0: a free port); beyond ``limit_concurrency`` open
    connections uvicorn answers 503."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=1,
        timeout_keep_alive=30,
        limit_concurrency=limit_concurrency,
    )
    return EmbeddedServer(config)
