"""The request path's one upstream client: an ``aiohttp.ClientSession`` with bounded pools.

Chosen by measurement (``benchmarks/overhead``, client comparison): a minimal raw-ASGI proxy
spends ~16x less CPU per request with aiohttp's client than with httpx's, whose connection
pool checks every idle connection on every request (``has_expired`` -> ``getpeername`` +
``poll``). Background control-plane calls (health probes, metric scrapes, a few per second)
keep using httpx (:mod:`gateway.services`).

The session is made on first use, inside the running event loop (aiohttp binds it to the
loop), and closed by :meth:`Upstream.aclose` at app shutdown. Limits and timeouts, all from
:class:`gateway.settings.ProxySettings`:

* ``max_connections`` connections in all (aiohttp's ``limit``), idle ones kept
  ``keepalive_expiry_s``; TCP_NODELAY is set by aiohttp on every connection;
* ``connect``: waiting for a pooled connection plus connecting (``pool_timeout_s +
  connect_timeout_s``); ``sock_connect``: the TCP connect alone (``connect_timeout_s``);
* ``sock_read``: the longest gap between two reads (``read_timeout_s``);
* no aiohttp ``total``: the whole-request deadline (``total_timeout_s``) is the proxy's own
  cancel scope around every exchange (:mod:`gateway.proxy`), which also bounds writing the
  request body. aiohttp's total timer cost a task lookup and a timer per request for the
  same bound.

Bodies are relayed as they are: no automatic decompression and no ``Accept-Encoding``
header added.

Example::

    upstream = Upstream(settings.proxy)
    response = await upstream.post("http://127.0.0.1:8100/v1/completions", body, headers)
    ...
    await upstream.aclose()
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from gateway.settings import ProxySettings

__all__ = ["Upstream"]


class Upstream:
    """Owns the aiohttp session of the request path (see the module docstring)."""

    def __init__(self, settings: ProxySettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None,  # bounded by the proxy's deadline scope (see the module docstring)
            connect=settings.pool_timeout_s + settings.connect_timeout_s,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )

    def session(self) -> aiohttp.ClientSession:
        """The session, made on the first call (which must run inside the event loop)."""
        if self._session is None or self._session.closed:
            settings = self._settings
            connector = aiohttp.TCPConnector(
                limit=settings.max_connections,
                keepalive_timeout=settings.keepalive_expiry_s,
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

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
