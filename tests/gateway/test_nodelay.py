"""TCP_NODELAY on both sides of the gateway: accepted client sockets and upstream sockets.

Without it, a streamed response written in small pieces can wait for a delayed ACK (the
~40 ms per-response stall seen in peers on kept-alive connections). Checked on the live
sockets rather than by timing.
"""

from __future__ import annotations

import socket

import httpx
import orjson
import pytest

from gateway.settings import ProxySettings
from gateway.upstream import Upstream
from tests.gateway.conftest import StartEngines, StartGateway

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def _nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_gateway_sets_nodelay_on_accepted_connections(
    start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    with httpx.Client(timeout=10) as client:
        for _ in range(2):  # the second request reuses the kept-alive connection
            assert client.post(f"{gw.url}/v1/chat/completions", json=CHAT).status_code == 200
        connections = list(gw.server.server_state.connections)
        assert connections
        socks = [c.transport.get_extra_info("socket") for c in connections]
        assert all(_nodelay(s) for s in socks)


@pytest.mark.anyio
async def test_upstream_client_sets_nodelay(start_engines: StartEngines) -> None:
    ((_, srv),) = start_engines(1)
    upstream = Upstream.for_requests(ProxySettings())
    try:
        resp = await upstream.post(
            f"{srv.url}/v1/chat/completions",
            orjson.dumps({**CHAT, "max_tokens": 2, "fake": {"itl": 0.2}}),  # still streaming
            {"content-type": "application/json"},
        )
        sock = resp.connection.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert _nodelay(sock)
        assert resp.status == 200
        await resp.read()
        resp.release()
    finally:
        await upstream.aclose()
