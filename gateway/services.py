"""The Services container: everything with a lifetime, opened by the app's lifespan.

One ``httpx.AsyncClient`` (explicit timeouts and pool limits, ``TCP_NODELAY``), the endpoint
registry, the routing policies, the app-owned metrics registry, the health checker, the proxy
and the supervised background tasks. Tests build their own and pass it to ``create_app``.

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
from gateway.health import HealthChecker
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy, RequestObserver
from gateway.settings import EngineConfig, ProxySettings, Settings
from gateway.shutdown import InFlight
from gateway.tasks import supervise
from routing import Policy, build_policies, build_profile, builtin_policies


def make_client(settings: ProxySettings) -> httpx.AsyncClient:
    """The one upstream client: bounded pool, explicit timeouts, TCP_NODELAY on every socket."""
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
    endpoints: EndpointRegistry
    policies: dict[str, Policy]
    metrics: GatewayMetrics
    health: HealthChecker
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
        health = HealthChecker(
            client=client, endpoints=endpoints, settings=settings.health, metrics=metrics
        )
        proxy = Proxy(
            client=client,
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
            endpoints=endpoints,
            policies=make_policies(settings),
            metrics=metrics,
            health=health,
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
                try:
                    yield services
                finally:
                    tg.cancel_scope.cancel()


def make_policies(settings: Settings) -> dict[str, Policy]:
    """Every built-in policy plus the profiles from the config (a profile may shadow one)."""
    policies = build_policies(builtin_policies())
    for name, spec in settings.routing.profiles.items():
        policies[name] = build_profile(name, spec)
    return policies


def add_engine(endpoints: EndpointRegistry, engine: EngineConfig) -> EndpointState:
    key = engine.api_key.get_secret_value() if engine.api_key else None
    return endpoints.add(engine.url, endpoint_id=engine.id, models=engine.models, api_key=key)
