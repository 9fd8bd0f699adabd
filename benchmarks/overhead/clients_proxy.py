"""A minimal raw-ASGI reverse proxy for the client-library comparison (:mod:`.clients`):
no routing beyond a rotation over the engines, no metrics, no logging; the request body is
read whole, the response is streamed through chunk by chunk. Runs under uvicorn with uvloop
and httptools, access log off.

    python -m benchmarks.overhead.clients_proxy --client aiohttp|httpx --port P --engines U,U,U

``aiohttp``: one ``ClientSession`` (``TCPConnector`` with a per-host limit, keep-alive,
TCP_NODELAY). ``httpx``: tuned -- one ``AsyncClient`` with its own ``AsyncHTTPTransport``
per engine (so each pool holds only that engine's connections and its scans stay short),
TCP_NODELAY socket option, ``sniffio`` importable.
"""

from __future__ import annotations

import argparse
import itertools
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PASS_HEADERS = (b"content-type", b"authorization")
LIMIT = 256


async def _body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return b"".join(parts)
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(parts)


def _head(status: int, headers: list[tuple[str, str]]) -> Message:
    keep = {"content-type", "content-length"}
    chunked = any(k.lower() == "transfer-encoding" for k, _ in headers)
    out = [(k.lower().encode(), v.encode()) for k, v in headers
           if k.lower() in keep and not (chunked and k.lower() == "content-length")]  # fmt: skip
    return {"type": "http.response.start", "status": status, "headers": out}


class Proxy:
    def __init__(self, client: str, engines: list[str]) -> None:
        self.kind = client
        self.engines = engines
        self.rotation = itertools.cycle(range(len(engines)))
        self.session: Any = None
        self.httpx_clients: list[Any] = []

    async def startup(self) -> None:
        if self.kind == "aiohttp":
            import aiohttp

            conn = aiohttp.TCPConnector(
                limit=LIMIT * len(self.engines), limit_per_host=LIMIT, keepalive_timeout=60
            )
            self.session = aiohttp.ClientSession(
                connector=conn,
                timeout=aiohttp.ClientTimeout(total=300, sock_connect=2),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        else:
            import httpx
            import sniffio  # noqa: F401 - httpx's async-library lookup needs it importable

            opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            limits = httpx.Limits(max_connections=LIMIT, max_keepalive_connections=LIMIT)
            self.httpx_clients = [
                httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(limits=limits, socket_options=opts),
                    timeout=httpx.Timeout(300.0, connect=2.0),
                    base_url=url,
                )
                for url in self.engines
            ]

    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()
        for c in self.httpx_clients:
            await c.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await self.startup()
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = await _body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k in PASS_HEADERS}
        i = next(self.rotation)
        if self.kind == "aiohttp":
            url = self.engines[i] + scope["path"]
            async with self.session.request(
                scope["method"], url, data=body, headers=headers
            ) as resp:
                await send(_head(resp.status, list(resp.headers.items())))
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        else:
            client = self.httpx_clients[i]
            req = client.build_request(scope["method"], scope["path"], content=body,
                                       headers=headers)  # fmt: skip
            resp = await client.send(req, stream=True)
            try:
                await send(_head(resp.status_code, list(resp.headers.items())))
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                await resp.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="minimal ASGI reverse proxy (client comparison)")
    ap.add_argument("--client", choices=("aiohttp", "httpx"), required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--engines", required=True, help="comma-separated engine URLs")
    args = ap.parse_args(argv)
    import uvicorn

    uvicorn.run(
        Proxy(args.client, args.engines.split(",")), host="127.0.0.1", port=args.port,
        loop="uvloop", http="httptools", access_log=False, log_level="warning", lifespan="on",
    )  # fmt: skip


if __name__ == "__main__":
    main()
