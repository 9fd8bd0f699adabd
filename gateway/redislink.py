"""The gateway's one Redis client and its health: a circuit breaker in front of redis-py.

Everything that shares state across replicas (keys, limits, routing state) goes through
:meth:`RedisLink.call`. Every call is bounded by ``redis.timeout_s`` (socket timeouts and an
outer deadline; redis-py's own retries are off: a retry is the caller's decision). A refused
or broken connection opens the breaker at once, three timeouts in a row do (the bound is
measured on this process's event loop, so a saturated gateway's own scheduling delay shows up
as a late Redis answer: at 50 ms, two replicas under a 200-request burst on two cores opened
the breaker and fell back to local limits; the default is 250 ms). While the breaker is open,
callers get ``None`` at once (no request waits on Redis) and fall back to local state, and a
background probe (``PING`` every ``retry_s``) closes it again when Redis answers, so a gateway
recovers without a restart. Health is exported (``switchyard_redis_healthy_ratio``,
``switchyard_redis_errors_total``) and shown in ``/ready`` (never the URL's password).

Deployments (:mod:`gateway.redisurl` parses the URL): one server (``redis://``,
``rediss://``, ``unix://``); a Sentinel-managed master (``redis+sentinel://s1,s2/svc/0``:
the sentinels are asked where the master is on every new connection, so a failover is
followed without a restart; the URL's user and password are the master's, the sentinels are
asked without them); a Redis Cluster (``redis+cluster://n1:7000,n2:7000``). On a
cluster :meth:`RedisLink.key` wraps the whole prefix in braces (``{switchyard}:...``): every
key of this gateway hashes to ONE slot, so the multi-key scripts and the key store's
WATCH/MULTI transaction work, and all of Switchyard's load sits on one shard (small: one
batched limiter call per event-loop tick per replica, one routing sync per
``sync_interval_s``). The same bounds (timeouts, no client retries, ``max_connections`` per
server) apply to every kind. Tested on one redis-server, one master + one sentinel (and a
failover to a replica), and a three-master cluster (tests/gateway/test_redis_topologies.py).

Without ``redis_url`` there is no link at all (``Services.redis`` is None).

Example::

    link = RedisLink.from_url("redis://127.0.0.1:6379/0", settings.redis)
    value = await link.call("get", lambda r: r.get(link.key("x")))   # None when down
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException

from gateway.metricspec import Label, MetricSpec
from gateway.redisurl import RedisTarget, parse_redis_url
from gateway.settings import RedisSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUTS_TO_OPEN = 3
"""Timed-out calls in a row that open the breaker (a refused connection opens it at once)."""

# What a failed call raises: redis-py's errors, socket errors, our deadline, and the cluster
# client's own exception (not a RedisError: "cannot be connected", no slot coverage...).
REDIS_ERRORS = (aioredis.RedisError, RedisClusterException, OSError, TimeoutError)

__all__ = ["RedisCollector", "RedisLink", "cluster_prefix", "redact_url"]


def redact_url(url: str) -> str:
    """``url`` without its password (for logs and ``/ready``); any scheme, several hosts."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hosts}{slash}{tail}"


def cluster_prefix(prefix: str) -> str:
    """``key_prefix`` as one hash tag: ``switchyard:`` -> ``{switchyard}:``. Redis hashes a
    key by its FIRST ``{...}``, so every key under it (``{switchyard}:{rl}:...`` too) lives
    in one slot."""
    name = prefix.rstrip(":")
    if not name:
        raise ValueError("redis.key_prefix must not be empty with a Redis Cluster URL")
    return "{" + name + "}" + prefix[len(name) :]


class RedisLink:
    """One redis-py asyncio client with a breaker (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: RedisSettings,
        *,
        url: str,
        clock: Callable[[], float] = time.monotonic,
        cluster: bool = False,
        also_close: tuple[aioredis.Redis, ...] = (),
    ) -> None:
        self.client = client
        self._also_close = also_close  # the sentinels' own clients
        self.settings = settings
        self.url = redact_url(url)
        self.cluster = cluster
        self.prefix = cluster_prefix(settings.key_prefix) if cluster else settings.key_prefix
        self._clock = clock
        self.up = True  # optimistic until the first call says otherwise
        self.last_error: str | None = None
        self.down_since: float | None = None
        self.errors: dict[str, int] = {}
        self.transitions = 0
        self._timeouts = 0  # consecutive timed-out calls
        self._listeners: list[Callable[[bool], None]] = []

    @classmethod
    def from_url(cls, url: str, settings: RedisSettings) -> RedisLink:
        """The client for ``url`` (any form of :mod:`gateway.redisurl`; ``ValueError`` for a
        bad one). Connects lazily: nothing is sent before the first call."""
        target = parse_redis_url(url)
        bounds: dict[str, Any] = {
            "socket_timeout": settings.timeout_s,
            "socket_connect_timeout": settings.timeout_s,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": settings.max_connections,
            "health_check_interval": 0,
        }
        if target.kind == "sentinel":
            master, sentinels = _sentinel_master(target, bounds)
            return cls(master, settings, url=url, also_close=sentinels)
        if target.kind == "cluster":
            return cls(_cluster(target, bounds), settings, url=url, cluster=True)
        client = aioredis.Redis.from_url(url, retry_on_timeout=False, **bounds)
        return cls(client, settings, url=url)

    def key(self, *parts: str) -> str:
        """A key in this gateway's namespace: ``<key_prefix><part>:<part>...`` (on a
        cluster the prefix is one hash tag, see :func:`cluster_prefix`)."""
        return self.prefix + ":".join(parts)

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(up)`` whenever the link goes down or comes back."""
        self._listeners.append(listener)

    async def call(self, op: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T | None:
        """``await fn(client)`` within ``timeout_s``; None (and the breaker opens) on any
        Redis error or timeout, or at once while the breaker is open."""
        if not self.up:
            return None
        try:
            async with asyncio.timeout(self.settings.timeout_s * 2):
                result = await fn(self.client)
        except REDIS_ERRORS as exc:
            self.failed(op, exc)
            return None
        self._timeouts = 0
        return result

    def failed(self, op: str, exc: BaseException) -> None:
        """Count a failed call and open the breaker (callers that ran their own call): at once
        for a refused or broken connection, after :data:`TIMEOUTS_TO_OPEN` timeouts in a row
        (one late answer is more often this process's own event-loop lag than Redis)."""
        self.errors[op] = self.errors.get(op, 0) + 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        if isinstance(exc, TimeoutError | aioredis.TimeoutError):
            self._timeouts += 1
            if self._timeouts < TIMEOUTS_TO_OPEN:
                return
        if self.up:
            self.up = False
            self.down_since = self._clock()
            self.transitions += 1
            log.warning("redis %s is unavailable (%s); serving on local state", self.url,
                        self.last_error)  # fmt: skip
            self._notify(False)

    async def probe(self) -> bool:
        """One ``PING`` (on a cluster an ``EXISTS`` of a key of ours: it goes to the shard
        that holds this gateway's slot, wherever that is); closes the breaker when it
        answers."""
        try:
            async with asyncio.timeout(self.settings.timeout_s * 2):
                if self.cluster:
                    await self.client.exists(self.key("probe"))
                else:
                    await self.client.ping()
        except REDIS_ERRORS as exc:
            self.failed("ping", exc)
            return False
        self._timeouts = 0
        if not self.up:
            self.up = True
            self.down_since = None
            self.transitions += 1
            log.warning("redis %s is back; shared state resumes", self.url)
            self._notify(True)
        return True

    async def run(self) -> None:
        """Background: probe every ``retry_s`` (also while up, so an idle gateway notices)."""
        while True:
            await self.probe()
            await asyncio.sleep(self.settings.retry_s)

    def describe(self) -> dict[str, Any]:
        """For ``/ready``: up or degraded, since when, the last error (no secrets)."""
        out: dict[str, Any] = {"url": self.url, "status": "up" if self.up else "degraded"}
        if not self.up and self.down_since is not None:
            out["down_for_s"] = round(self._clock() - self.down_since, 3)
            out["last_error"] = self.last_error
        return out

    async def aclose(self) -> None:
        await self.client.aclose()
        for client in self._also_close:
            await client.aclose()

    def _notify(self, up: bool) -> None:
        for listener in self._listeners:
            try:
                listener(up)
            except Exception:
                log.exception("redis state listener failed")


def _sentinel_master(
    target: RedisTarget, bounds: dict[str, Any]
) -> tuple[aioredis.Redis, tuple[aioredis.Redis, ...]]:
    """The master the sentinels name for ``target.service``, and the sentinels' clients
    (asked with the same socket bounds and TLS, without the URL's user and password)."""
    assert target.service is not None
    ask = {k: v for k, v in bounds.items() if k.startswith("socket_") or k == "retry"}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.hosts),
        sentinel_kwargs={**ask, "ssl": target.tls, "max_connections": bounds["max_connections"]},
        retry_on_timeout=False,
        **bounds,
    )
    client: aioredis.Redis = sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
    )
    return client, tuple(sentinel.sentinels)


def _cluster(target: RedisTarget, bounds: dict[str, Any]) -> aioredis.Redis:
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        username=target.username,
        password=target.password,
        ssl=target.tls,
        **bounds,
    )
    # Not a Redis subclass, but it serves every command Switchyard sends (EVALSHA, scripts,
    # pipelines, one-slot WATCH/MULTI): tests/gateway/test_redis_topologies.py runs them all.
    return cast(aioredis.Redis, cluster)


OPS = (
    "ping", "ratelimit", "shared_state", "shared_state_leave", "keys_load", "keys_version",
    "keys_write",
)  # fmt: skip
"""Every ``op`` passed to :meth:`RedisLink.call` (a test greps the callers against it)."""

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("switchyard_redis_healthy_ratio", "gauge", "ratio", when="redis_url"),
    MetricSpec("switchyard_redis_errors_total", "counter", "errors",
               (Label("op", values=OPS),), when="redis_url"),
    MetricSpec("switchyard_redis_transitions_total", "counter", "transitions", when="redis_url"),
)  # fmt: skip


class RedisCollector(Collector):
    """``switchyard_redis_healthy_ratio``, ``switchyard_redis_errors_total{op}`` and
    ``switchyard_redis_transitions_total``, read at scrape."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "switchyard_redis_healthy_ratio",
            "1 while Redis answers, 0 while the gateway serves on local state",
            value=1.0 if self._link.up else 0.0,
        )
        errors = CounterMetricFamily(
            "switchyard_redis_errors", "Failed Redis calls by operation", labels=["op"]
        )
        for op, n in sorted(self._link.errors.items()):
            errors.add_metric([op], n)
        yield errors
        yield CounterMetricFamily(
            "switchyard_redis_transitions",
            "Times the Redis link went down or came back",
            value=self._link.transitions,
        )
