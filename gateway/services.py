"""The Services container: everything with a lifetime, opened by the app's lifespan.

The request path's :class:`gateway.upstream.Upstream` (aiohttp, chosen by measurement), one
``httpx.AsyncClient`` for the control plane (health probes and metric scrapes: explicit
timeouts and pool limits, ``TCP_NODELAY``), the endpoint registry, the router (policies,
prefix index, VTC counters), the app-owned metrics registry, the health checker, the
metrics scraper, the KV-event consumers, the proxy and the supervised background tasks.
Tests build their own and pass it to ``create_app``.

Example::

    async with Services.open(settings) as services:
        services.endpoints.add("http://127.0.0.1:8100")
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

from gateway.endpoints import EndpointRegistry, EndpointState
from gateway.exchange import RequestObserver
from gateway.health import HealthChecker
from gateway.kvevents import KVEventConsumers
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.router import Router, RoutingCollector
from gateway.scraper import MetricsScraper
from gateway.settings import EngineConfig, ProxySettings, Settings
from gateway.shutdown import InFlight
from gateway.tasks import supervise
from gateway.upstream import Upstream


def make_client(settings: ProxySettings) -> httpx.AsyncClient:
    """The control-plane client (probes, scrapes): bounded pool, explicit timeouts,
    TCP_NODELAY on every socket. A few requests per second per engine, so httpx's per-request
    pool scan (the reason the request path uses aiohttp) does not matter here."""
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive_connections,
            keepalive_expiry=settings.keepalive_expiry_s,
        ),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        retries=0,
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(
            connect=settings.connect_timeout_s,
            read=settings.read_timeout_s,
            write=settings.write_timeout_s,
            pool=settings.pool_timeout_s,
        ),
        follow_redirects=False,
        trust_env=False,
    )


@dataclass(slots=True)
class Services:
    settings: Settings
    client: httpx.AsyncClient
    upstream: Upstream
    endpoints: EndpointRegistry
    router: Router
    metrics: GatewayMetrics
    health: HealthChecker
    scraper: MetricsScraper
    kv_events: KVEventConsumers
    proxy: Proxy
    config_path: Path | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        client: httpx.AsyncClient,
        *,
        config_path: Path | None = None,
        observers: tuple[RequestObserver, ...] = (),
        inflight: InFlight | None = None,
    ) -> Services:
        endpoints = EndpointRegistry()
        for engine in settings.engines:
            add_engine(endpoints, engine)
        metrics = GatewayMetrics.create(endpoints)
        router = Router(settings, endpoints, metrics)
        metrics.registry.register(RoutingCollector(router))
        health = HealthChecker(
            client=client, endpoints=endpoints, settings=settings.health, metrics=metrics
        )
        upstream = Upstream(settings.proxy)
        proxy = Proxy(
            upstream=upstream,
            endpoints=endpoints,
            health=health,
            metrics=metrics,
            settings=settings.proxy,
            observers=observers,
            inflight=inflight,
        )
        return cls(
            settings=settings,
            client=client,
            upstream=upstream,
            endpoints=endpoints,
            router=router,
            metrics=metrics,
            health=health,
            scraper=MetricsScraper(
                client=client, endpoints=endpoints, settings=settings.routing, metrics=metrics
            ),
            kv_events=KVEventConsumers(endpoints, router),
            proxy=proxy,
            config_path=config_path,
        )

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        *,
        config_path: Path | None = None,
        inflight: InFlight | None = None,
    ) -> AsyncIterator[Services]:
        """Client, registry and background tasks for the app's lifetime."""
        async with make_client(settings.proxy) as client:
            services = cls.build(settings, client, config_path=config_path, inflight=inflight)
            await services.health.check_once()
            async with anyio.create_task_group() as tg:
                tg.start_soon(supervise, "health-checker", services.health.run)
                if settings.routing.scrape_interval_s > 0:
                    await services.scraper.scrape_once()
                    tg.start_soon(supervise, "metrics-scraper", services.scraper.run)
                tg.start_soon(supervise, "kv-events", services.kv_events.run)
                try:
                    yield services
                finally:
                    tg.cancel_scope.cancel()
                    await services.upstream.aclose()


def add_engine(endpoints: EndpointRegistry, engine: EngineConfig) -> EndpointState:
    key = engine.api_key.get_secret_value() if engine.api_key else None
    return endpoints.add(
        engine.url,
        endpoint_id=engine.id,
        models=engine.models,
        api_key=key,
        kv_events=engine.kv_events,
    )
