"""The gateway's HTTP clients to engines: aiohttp sessions with bounded pools.

Two instances per app, so a pool full of long streams never starves health probes:

* :meth:`Upstream.for_requests` -- the request path (proxied requests);
* :meth:`Upstream.for_control` -- the control plane (health probes, metric scrapes), a small
  pool of its own.

aiohttp was chosen by measurement (``benchmarks/overhead``, client comparison): a minimal
raw-ASGI proxy spends several times less CPU per request with aiohttp's client than with
httpx's, whose connection pool checks every idle connection on every request
(``has_expired`` -> ``getpeername`` + ``poll``). The control plane uses it too: one client
library, and background scrapes no longer cost more CPU than the requests they steer.

A session is made on first use, inside the running event loop (aiohttp binds it to the
loop), and closed by :meth:`Upstream.aclose` at app shutdown. Request-path limits and
timeouts, all from :class:`gateway.settings.ProxySettings`:

* ``max_connections`` connections in all (aiohttp's ``limit``), idle ones kept
  ``keepalive_expiry_s``; TCP_NODELAY is set by aiohttp on every connection;
* ``connect``: waiting for a pooled connection plus connecting (``pool_timeout_s +
  connect_timeout_s``); ``sock_connect``: the TCP connect alone (``connect_timeout_s``);
* ``sock_read``: the longest gap between two reads (``read_timeout_s``);
* no aiohttp ``total``: the whole-request deadline (``total_timeout_s``) is the proxy's own
  timer around every exchange (:mod:`gateway.proxy`), which also bounds writing the request
  body. aiohttp's total timer cost a task lookup and a timer per request for the same bound.

Control-plane calls (:meth:`Upstream.get`) each carry their own total timeout and a cap on
the body they read. Bodies are relayed as they are: no automatic decompression and no
``Accept-Encoding`` header added.

Example::

    upstream = Upstream.for_requests(settings.proxy)
    response = await upstream.post("http://127.0.0.1:8100/v1/completions", body, headers)
    ...
    await upstream.aclose()
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from gateway.settings import ProxySettings

__all__ = ["Upstream"]


class BodyTooLong(Exception):
    """A control-plane answer longer than the caller's cap."""


CONTROL_CONNECTIONS = 64
"""The control plane's pool: probes and scrapes are bounded fan-outs (32 at a time each)."""


class Upstream:
    """Owns one aiohttp session (see the module docstring)."""

    def __init__(self, *, limit: int, keepalive_s: float, timeout: aiohttp.ClientTimeout) -> None:
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_requests(cls, settings: ProxySettings) -> Upstream:
        return cls(
            limit=settings.max_connections,
            keepalive_s=settings.keepalive_expiry_s,
            timeout=aiohttp.ClientTimeout(
                total=None,  # bounded by the proxy's deadline (see the module docstring)
                connect=settings.pool_timeout_s + settings.connect_timeout_s,
                sock_connect=settings.connect_timeout_s,
                sock_read=settings.read_timeout_s,
            ),
        )

    @classmethod
    def for_control(cls, settings: ProxySettings) -> Upstream:
        """Each call passes its own total timeout (:meth:`get`); this one is a backstop."""
        return cls(
            limit=CONTROL_CONNECTIONS,
            keepalive_s=settings.keepalive_expiry_s,
            timeout=aiohttp.ClientTimeout(total=30.0, sock_connect=settings.connect_timeout_s),
        )

    def session(self) -> aiohttp.ClientSession:
        """The session, made on the first call (which must run inside the event loop)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                keepalive_timeout=self._keepalive_s,
                use_dns_cache=True,
                ttl_dns_cache=10,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding",),
                trust_env=False,
                raise_for_status=False,
            )
        return self._session

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send ``body`` and return once the response head is in (the body is not read)."""
        return await self.session().post(
            url, data=body, headers=headers, allow_redirects=False, compress=None
        )

    async def get(
        self, url: str, *, headers: Mapping[str, str], timeout_s: float, max_bytes: int
    ) -> tuple[int, bytes]:
        """A bounded control-plane GET: (status, body); :class:`BodyTooLong` past
        ``max_bytes``. aiohttp's and timeout errors propagate to the caller."""
        async with self.session().get(
            url,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            body = bytearray()
            while chunk := await response.content.readany():
                body += chunk
                if len(body) > max_bytes:
                    raise BodyTooLong(f"{url}: more than {max_bytes} bytes")
            return response.status, bytes(body)

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
