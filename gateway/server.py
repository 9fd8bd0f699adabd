"""Run the ASGI app under uvicorn inside an event loop we own (no uvicorn signal handlers).

The CLI runs the gateway next to other tasks (simulated engines) in one anyio task group and
handles Ctrl-C itself, so uvicorn must not install or re-raise signals. Accepted sockets get
``TCP_NODELAY`` explicitly: a streamed response written in small pieces must not wait for a
delayed ACK (the ~40 ms stall seen in peers).

Example::

    server = make_server(app, host="127.0.0.1", port=8000)
    await server.serve()            # returns after server.should_exit = True
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _protocol_class() -> type[asyncio.Protocol]:
    base: type[Any]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
        base = H11Protocol

    class NoDelayProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            set_nodelay(transport)
            super().connection_made(transport)

    return NoDelayProtocol


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(
    app: Any,
    *,
    host: str,
    port: int,
    limit_concurrency: int | None = None,
    graceful_shutdown_s: float | None = None,
    log_level: str = "warning",
    access_log: bool = False,
) -> EmbeddedServer:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_protocol_class(),
        lifespan="on",
        log_config=None,
        log_level=log_level.lower(),
        access_log=access_log,
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=None if graceful_shutdown_s is None else int(graceful_shutdown_s),
        timeout_keep_alive=30,
        # Nothing reads the client address; uvicorn's X-Forwarded-For middleware would be one
        # more ASGI level on every request.
        proxy_headers=False,
    )
    return EmbeddedServer(config)


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (useful with ``port=0``)."""
    for srv in server.servers:
        for sock in srv.sockets:
            return int(sock.getsockname()[1])
    raise RuntimeError("server is not listening")
