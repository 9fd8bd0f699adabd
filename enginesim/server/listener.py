"""The ``refuse_connections`` fault: stop listening on an engine's port, and listen again later.

Refusing closes uvicorn's listening socket and aborts open connections, so clients see
``ECONNREFUSED`` / resets like a crashed process. The port stays *reserved* meanwhile by a bound,
non-listening socket (nothing can steal it; the kernel still refuses connections), and resuming
turns that socket into the new listener with uvicorn's own protocol factory. Failures are logged,
never raised into the cluster's task group.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import anyio
import uvicorn
from anyio.abc import TaskGroup

from enginesim.server.faults import FaultInjector

__all__ = ["RefusableListener"]

log = logging.getLogger(__name__)

BACKLOG = 2048
ADMIN_REPLY_GRACE_S = 0.05


class RefusableListener:
    """Implements ``ListenerControl`` for one uvicorn server.

    >>> lst = RefusableListener(server, faults, tg); lst.bind()  # after server.started
    >>> lst.refuse(for_s=2.0)
    """

    def __init__(self, server: uvicorn.Server, faults: FaultInjector, tg: TaskGroup) -> None:
        self._server = server
        self._faults = faults
        self._tg = tg
        self._addr: tuple[str, int] = ("", 0)
        self._family = socket.AF_INET
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self._reserved: socket.socket | None = None

    def bind(self) -> int:
        """Remember the bound address and uvicorn's protocol factory; returns the port."""
        srv = self._server.servers[0]
        sock = srv.sockets[0]
        self._family = socket.AddressFamily(sock.family)
        host, port = sock.getsockname()[:2]
        self._addr = (str(host), int(port))
        self._factory = self._protocol_factory()
        return self._addr[1]

    def _protocol_factory(self) -> Callable[[], asyncio.Protocol]:
        """The factory uvicorn's ``startup()`` builds (a closure there, so rebuilt from the
        same public pieces; the listening server's own attribute exists only on asyncio's
        loop, not uvloop's)."""
        server = self._server
        config = server.config

        def create_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=server.server_state, app_state=server.lifespan.state
            )
            return protocol

        return create_protocol

    def refuse(self, for_s: float | None) -> None:
        self._tg.start_soon(self._refuse, for_s)

    def resume(self) -> None:
        self._tg.start_soon(self._listen)

    def close(self) -> None:
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    async def _refuse(self, for_s: float | None) -> None:
        await anyio.sleep(ADMIN_REPLY_GRACE_S)  # let the admin response leave first
        for srv in self._server.servers:
            srv.close()
        self._server.servers = []
        self._reserve()
        for conn in list(self._server.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        if for_s is not None:
            await anyio.sleep(for_s)
            self._faults.set_refusing(False)
            await self._listen()

    def _reserve(self) -> None:
        if self._reserved is not None:
            return
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self._addr)
        except OSError:
            log.exception("could not reserve port %s while refusing connections", self._addr)
            sock.close()
            return
        self._reserved = sock

    async def _listen(self) -> None:
        if self._factory is None or any(s.is_serving() for s in self._server.servers):
            return
        loop = asyncio.get_running_loop()
        try:
            if self._reserved is not None:
                sock, self._reserved = self._reserved, None
                sock.listen(BACKLOG)
                srv = await loop.create_server(self._factory, sock=sock)
            else:
                host, port = self._addr
                srv = await loop.create_server(self._factory, host, port, reuse_address=True)
        except OSError:
            log.exception("could not listen again on %s", self._addr)
            return
        self._server.servers.append(srv)
