"""The Services container: everything with a lifetime, opened by the app's lifespan.

Two :class:`gateway.upstream.Upstream` sessions (aiohttp, chosen by measurement): the
request path's and the control plane's (health probes and metric scrapes, a small pool of
its own so long streams never starve probes), the endpoint registry, the router (policies,
prefix index, VTC counters), the app-owned metrics registry, the health checker, the
metrics scraper, the KV-event consumers, the proxy, admission control (the wait queue) and
the supervised background tasks (the slow-engine check among them).
Tests build their own and pass it to ``create_app``.

Example::

    async with Services.open(settings) as services:
        services.endpoints.add("http://127.0.0.1:8100")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from gateway.admission import Admission
from gateway.endpoints import EndpointRegistry, EndpointState
from gateway.exchange import RequestObserver
from gateway.health import HealthChecker
from gateway.keys import KeysCollector, KeyStore
from gateway.kvevents import KVEventConsumers
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.ratelimit import RateLimiter
from gateway.redislink import RedisCollector, RedisLink
from gateway.router import Router, RoutingCollector
from gateway.scraper import MetricsScraper
from gateway.settings import EngineConfig, Settings
from gateway.sharedstate import SharedRoutingState
from gateway.shutdown import InFlight
from gateway.tasks import supervise
from gateway.upstream import Upstream


@dataclass(slots=True)
class Services:
    settings: Settings
    upstream: Upstream
    control: Upstream
    endpoints: EndpointRegistry
    router: Router
    metrics: GatewayMetrics
    health: HealthChecker
    scraper: MetricsScraper
    kv_events: KVEventConsumers
    proxy: Proxy
    admission: Admission
    keys: KeyStore
    limiter: RateLimiter
    redis: RedisLink | None = None  # the one link to redis_url (None: everything in memory)
    shared: SharedRoutingState | None = None  # routing state shared with other replicas
    config_path: Path | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        config_path: Path | None = None,
        observers: tuple[RequestObserver, ...] = (),
        inflight: InFlight | None = None,
    ) -> Services:
        endpoints = EndpointRegistry(settings.outliers)
        for engine in settings.engines:
            add_engine(endpoints, engine)
        metrics = GatewayMetrics.create(endpoints)
        router = Router(settings, endpoints, metrics)
        metrics.registry.register(RoutingCollector(router))
        control = Upstream.for_control(settings.proxy)
        health = HealthChecker(
            client=control, endpoints=endpoints, settings=settings.health, metrics=metrics
        )
        upstream = Upstream.for_requests(settings.proxy)
        redis = None
        shared = None
        if settings.redis_url:
            redis = RedisLink.from_url(settings.redis_url, settings.redis)
            metrics.registry.register(RedisCollector(redis))
            shared = SharedRoutingState(
                redis, endpoints=endpoints, router=router, settings=settings,
                registry=metrics.registry,
            )  # fmt: skip
        keys = KeyStore(settings, link=redis)
        metrics.registry.register(KeysCollector(keys))
        # Fair share while Redis is down: limit / live replicas (the last count seen).
        fallback = settings.limits.replicas
        limiter = RateLimiter(
            settings.limits, redis, replicas=shared.replicas if shared else lambda: fallback
        )
        metrics.registry.register(limiter.collector())
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
            upstream=upstream,
            control=control,
            endpoints=endpoints,
            router=router,
            metrics=metrics,
            health=health,
            scraper=MetricsScraper(
                client=control, endpoints=endpoints, settings=settings.routing, metrics=metrics
            ),
            kv_events=KVEventConsumers(endpoints, router),
            proxy=proxy,
            admission=Admission(
                settings.admission, endpoints=endpoints, metrics=metrics, inflight=proxy.inflight
            ),
            keys=keys,
            limiter=limiter,
            redis=redis,
            shared=shared,
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
        services = cls.build(settings, config_path=config_path, inflight=inflight)
        try:
            await services.health.check_once()
            async with anyio.create_task_group() as tg:
                tg.start_soon(supervise, "health-checker", services.health.run)
                if settings.routing.scrape_interval_s > 0:
                    await services.scraper.scrape_once()
                    tg.start_soon(supervise, "metrics-scraper", services.scraper.run)
                tg.start_soon(supervise, "kv-events", services.kv_events.run)
                tg.start_soon(supervise, "slow-engines", services.endpoints.run_slow_checks)
                if services.redis is not None:
                    await services.keys.refresh()  # shared keys before serving (bounded)
                    tg.start_soon(supervise, "redis-link", services.redis.run)
                    tg.start_soon(supervise, "api-keys", services.keys.run)
                    tg.start_soon(supervise, "rate-limit-settlements", services.limiter.run)
                if services.shared is not None:
                    tg.start_soon(supervise, "shared-state", services.shared.run)
                try:
                    yield services
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await services.aclose()

    async def aclose(self) -> None:
        """Close both HTTP sessions (opened on first use on the serving loop)."""
        await self.upstream.aclose()
        await self.control.aclose()
        await self.limiter.aclose()  # pending settlements, bounded by the link's timeout
        if self.shared is not None:
            await self.shared.leave()  # bounded by the link's timeout
        if self.redis is not None:
            await self.redis.aclose()


def add_engine(endpoints: EndpointRegistry, engine: EngineConfig) -> EndpointState:
    key = engine.api_key.get_secret_value() if engine.api_key else None
    return endpoints.add(
        engine.url,
        endpoint_id=engine.id,
        models=engine.models,
        api_key=key,
        kv_events=engine.kv_events,
    )
