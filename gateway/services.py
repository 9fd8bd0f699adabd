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

from autoscale.arrivals import ArrivalCounter
from gateway.accesslog import AccessLog
from gateway.admission import Admission
from gateway.autoscaling import Autoscaler, build_embedded
from gateway.discovery import KubernetesDiscovery
from gateway.endpoints import EndpointRegistry, EndpointState
from gateway.exchange import RequestObserver
from gateway.health import HealthChecker
from gateway.keys import KeysCollector, KeyStore
from gateway.kvevents import KVEventConsumers
from gateway.kvtier import TierCollector, TierResidency
from gateway.lora import LoraManager
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
    discovery: KubernetesDiscovery | None = None  # engines from pods (discovery.kind kubernetes)
    autoscaler: Autoscaler | None = None  # the embedded autoscaler (autoscaling.enabled)
    config_path: Path | None = None
    lora: LoraManager | None = None  # LoRA registry, on-demand loads, placement (lora:)
    access_log: AccessLog | None = None  # server.access_log: one line per proxied request

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
        router.tier = TierResidency.from_settings(settings)  # None unless kv_tier.enabled
        if router.tier is not None:
            metrics.registry.register(TierCollector(router.tier))
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
        discovery = None
        if settings.discovery.kind == "kubernetes":
            # New pods are probed at once (routable within the pool's 2 s bound, not at the
            # next health round); removed ones leave the router's per-engine state.
            discovery = KubernetesDiscovery(
                settings.discovery, endpoints=endpoints, on_added=health.probe,
                on_removed=router.forget,
            )  # fmt: skip
            metrics.registry.register(discovery.collector())
        autoscaler = None
        if settings.autoscaling.enabled:  # arrivals: counted as requests enter (proxied.py),
            router.arrivals = ArrivalCounter()  # read across replicas when they share Redis
            autoscaler = build_embedded(
                settings.autoscaling, endpoints=endpoints,
                arrivals=router.arrivals if shared is None else shared,
                registry=metrics.registry, scraped=settings.routing.scrape_interval_s > 0,
            )  # fmt: skip
        access_log = AccessLog() if settings.server.access_log else None
        proxy = Proxy(
            upstream=upstream,
            endpoints=endpoints,
            health=health,
            metrics=metrics,
            settings=settings.proxy,
            observers=observers if access_log is None else (*observers, access_log),
            inflight=inflight,
        )
        lora = LoraManager.build(
            settings, endpoints=endpoints, control=control, registry=metrics.registry,
            inflight=proxy.inflight,
        )  # fmt: skip
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
            discovery=discovery,
            autoscaler=autoscaler,
            config_path=config_path,
            lora=lora,
            access_log=access_log,
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
            if services.discovery is not None:
                await services.discovery.sync_once()  # the pods' engines before the first probe
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
                if services.discovery is not None:
                    tg.start_soon(supervise, "discovery", services.discovery.run)
                if services.lora is not None:
                    tg.start_soon(supervise, "lora", services.lora.run)
                if services.autoscaler is not None:  # releases its lease when cancelled
                    tg.start_soon(supervise, "autoscaler", services.autoscaler.run)
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
        if self.router.tier is not None:
            await self.router.tier.aclose()
        if self.discovery is not None:
            self.discovery.close()
        if self.autoscaler is not None:
            await self.autoscaler.aclose()
        if self.lora is not None:
            await self.lora.aclose()


def add_engine(endpoints: EndpointRegistry, engine: EngineConfig) -> EndpointState:
    key = engine.api_key.get_secret_value() if engine.api_key else None
    return endpoints.add(
        engine.url,
        endpoint_id=engine.id,
        models=engine.models,
        api_key=key,
        kv_events=engine.kv_events,
    )
