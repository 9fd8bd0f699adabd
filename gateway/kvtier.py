"""Tier residency for routing: how many of a prompt's leading blocks the shared KV tier holds.

The engines' KV connector (and ``enginesim --kv-tier``) key the tier by vLLM's own chained
block hashes, which the gateway cannot compute (SHA-256 seeded per deployment, over token
ids the gateway may not have). So every writer also stores a size-only *residency* key per
full prompt block it saved, keyed by the gateway's token-block hash
(:func:`kvcache.tier.residency_namespace` of the served model and the block size). This
module looks those keys up for a request: one pipelined EXISTS round trip for the whole
prefix (:class:`kvcache.blockstore.AsyncRedisBlockStore`), bounded three ways:

* **time**: the store's socket and pool timeouts are ``kv_tier.lookup_timeout_s`` and an
  outer deadline of the same length cancels a slow call; any failure answers 0 (routing as
  without a tier) and opens the store's breaker for ``retry_s`` (no request waits on a dead
  Redis);
* **hot path**: blocks seen present are remembered ``cache_ttl_s`` and the first absent
  block ``miss_ttl_s``, in one LRU of at most ``cache_max_entries`` entries, so a repeated
  prefix costs no round trip at all, and a round trip asks only for the blocks past the
  cached ones;
* **scope**: only token-mode blocks (``routing.prefix.tokenizer`` set, or token-id
  prompts) -- byte blocks never match an engine's keys, so those requests skip the lookup.

A residency key can outlive the block's bytes (Redis evicts them independently under
``allkeys-lru``): the engine then recomputes what it cannot load -- routing was merely less
sticky than it could have been. The same TTLs bound how stale a positive can be.

What the lookups did is exported at scrape time by :class:`TierCollector`
(``switchyard_kv_tier_*``, docs/metrics.md): requests by how their lookup was answered,
prompt blocks looked up and blocks found held, the cache's size.

Example::

    tier = TierResidency.from_settings(settings)           # None unless kv_tier.enabled
    blocks_held = await tier.leading("llama", blocks)       # 0 on any doubt
    registry.register(TierCollector(tier))
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.metricspec import Label, MetricSpec
from gateway.prefix import Blocks
from gateway.settings import KvTierSettings, Settings
from kvcache.blockstore import AsyncRedisBlockStore, StoreStats
from kvcache.tier import TierNamespace, residency_namespace

__all__ = ["METRICS", "OUTCOMES", "ResidencyStats", "TierCollector", "TierResidency"]

OUTCOMES = ("cache", "redis", "error", "breaker", "timeout", "skipped")
"""How a request's tier lookup was answered: from the cache alone, by a Redis round trip,
0 after a failed round trip (the breaker opens), 0 without asking (the breaker was open),
what the cache knew when the deadline expired, or not at all (byte-mode blocks)."""

_Answered = Literal["cache", "redis", "error", "breaker", "timeout"]
_WHEN = "kv_tier.enabled"

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("switchyard_kv_tier_lookup_requests_total", "counter", "requests",
               (Label("outcome", values=OUTCOMES),), when=_WHEN),
    MetricSpec("switchyard_kv_tier_prompt_blocks_total", "counter", "blocks", when=_WHEN),
    MetricSpec("switchyard_kv_tier_held_blocks_total", "counter", "blocks", when=_WHEN),
    MetricSpec("switchyard_kv_tier_cache_entries", "gauge", "entries", when=_WHEN),
)  # fmt: skip
"""The families :class:`TierCollector` exports."""


class _Lookup(Protocol):
    async def lookup(self, ns: TierNamespace, hashes: Sequence[int]) -> int: ...
    def record_failure(self) -> None: ...
    def stats(self) -> StoreStats: ...


@dataclass(frozen=True, slots=True)
class ResidencyStats:
    """Counters since start, one outcome per request (:data:`OUTCOMES`): answered from the
    cache alone, by a round trip, after a failed round trip, with the breaker open, at the
    deadline, or skipped (not token mode); prompt blocks of the token-mode requests and the
    leading blocks found held (the ``tier_blocks`` routing got); the store's own stats."""

    cached: int
    fetched: int
    errors: int
    breaker: int
    timeouts: int
    skipped: int
    prompt_blocks: int
    held_blocks: int
    cache_entries: int
    store: StoreStats


class TierResidency:
    """See the module docstring; one per gateway process, used on the event loop only."""

    def __init__(
        self,
        settings: KvTierSettings,
        store: _Lookup,
        *,
        clock: Callable[[], float] = time.monotonic,
        aclose: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._aclose = aclose
        self._namespaces: dict[tuple[str, int], TierNamespace] = {}
        # (namespace digest, block hash) -> (expiry, present)
        self._cache: OrderedDict[tuple[int, int], tuple[float, bool]] = OrderedDict()
        self.cached = self.fetched = self.errors = self.breaker = self.timeouts = 0
        self.skipped = self.prompt_blocks = self.held_blocks = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> TierResidency | None:
        tier = settings.kv_tier
        url = tier.redis_url or settings.redis_url
        if not tier.enabled or not url:
            return None
        store = AsyncRedisBlockStore.from_url(
            url,
            max_connections=tier.max_connections,
            timeout_s=tier.lookup_timeout_s,
            retry_s=tier.retry_s,
        )
        return cls(tier, store, aclose=store.aclose)

    async def aclose(self) -> None:
        if self._aclose is not None:
            await self._aclose()

    def _namespace(self, model: str, block_tokens: int) -> TierNamespace:
        key = (model, block_tokens)
        ns = self._namespaces.get(key)
        if ns is None:
            ns = residency_namespace(model, block_tokens)
            if len(self._namespaces) < 1024:  # bounded: models x block sizes
                self._namespaces[key] = ns
        return ns

    def _remember(self, keys: Sequence[tuple[int, int]], present: bool, now: float) -> None:
        ttl = self._settings.cache_ttl_s if present else self._settings.miss_ttl_s
        if ttl <= 0:
            return
        cache, entry = self._cache, (now + ttl, present)
        for key in keys:
            cache[key] = entry
            cache.move_to_end(key)
        while len(cache) > self._settings.cache_max_entries:
            cache.popitem(last=False)

    async def leading(self, model: str, blocks: Blocks) -> int:
        """Leading blocks of ``blocks`` the tier holds (0 when unknown, down or slow)."""
        if blocks.mode != "tokens" or not blocks.hashes:
            self.skipped += 1
            return 0
        self.prompt_blocks += len(blocks.hashes)
        ns = self._namespace(model, blocks.block_tokens)
        digest, now = ns.digest, self._clock()
        cache, known = self._cache, 0
        for h in blocks.hashes:  # the hot path: inline, one dict lookup per block
            key = (digest, h)
            entry = cache.get(key)
            if entry is None:
                break
            if entry[0] <= now:  # expired
                del cache[key]
                break
            if not entry[1]:
                return self._answered("cache", known)
            known += 1
        if known == len(blocks.hashes):
            return self._answered("cache", known)
        rest = blocks.hashes[known:]
        found = 0
        before = self._store.stats()
        with anyio.move_on_after(self._settings.lookup_timeout_s) as scope:
            found = await self._store.lookup(ns, rest)
        if scope.cancelled_caught:  # a hung Redis: open the breaker (the store's own
            self._store.record_failure()  # timeouts, equal to ours, never fire first)
            return self._answered("timeout", known)
        if found == 0:
            # The store answers 0 on a failure and counts it; another request's failure
            # while this one awaited can only misfile an empty answer, never a positive one.
            after = self._store.stats()
            if after.skipped > before.skipped:
                return self._answered("breaker", known)
            if after.errors > before.errors:
                return self._answered("error", known)
        now = self._clock()
        self._remember([(digest, h) for h in rest[:found]], True, now)
        if found < len(rest):  # a real absence, not an error: remembered miss_ttl_s
            self._remember([(digest, rest[found])], False, now)
        return self._answered("redis", known + found)

    def _answered(self, outcome: _Answered, held: int) -> int:
        if outcome == "cache":
            self.cached += 1
        elif outcome == "redis":
            self.fetched += 1
        elif outcome == "error":
            self.errors += 1
        elif outcome == "breaker":
            self.breaker += 1
        else:
            self.timeouts += 1
        self.held_blocks += held
        return held

    def stats(self) -> ResidencyStats:
        return ResidencyStats(
            cached=self.cached,
            fetched=self.fetched,
            errors=self.errors,
            breaker=self.breaker,
            timeouts=self.timeouts,
            skipped=self.skipped,
            prompt_blocks=self.prompt_blocks,
            held_blocks=self.held_blocks,
            cache_entries=len(self._cache),
            store=self._store.stats(),
        )


class TierCollector(Collector):
    """The lookups' counters and the cache's size, read from :meth:`TierResidency.stats` at
    scrape time (so they cannot drift from what routing saw)."""

    def __init__(self, tier: TierResidency) -> None:
        self._tier = tier

    def collect(self) -> Iterator[Metric]:
        stats = self._tier.stats()
        requests = CounterMetricFamily(
            "switchyard_kv_tier_lookup_requests",
            "Requests routed with a tier residency lookup, by how it was answered (cache: the"
            " lookup cache alone; redis: a round trip; error: a failed round trip, answered 0"
            " and the breaker opened; breaker: answered 0 without asking, the breaker open;"
            " timeout: kv_tier.lookup_timeout_s expired; skipped: byte-mode blocks, no lookup)",
            labels=["outcome"],
        )
        counts = (stats.cached, stats.fetched, stats.errors, stats.breaker, stats.timeouts,
                  stats.skipped)  # fmt: skip
        for outcome, count in zip(OUTCOMES, counts, strict=True):
            requests.add_metric([outcome], count)
        yield requests
        yield CounterMetricFamily(
            "switchyard_kv_tier_prompt_blocks",
            "Prompt blocks of the requests whose tier residency was looked up (token mode)",
            value=stats.prompt_blocks,
        )
        yield CounterMetricFamily(
            "switchyard_kv_tier_held_blocks",
            "Leading prompt blocks the tier was found to hold (the tier_blocks routing got;"
            " share held = this / switchyard_kv_tier_prompt_blocks_total)",
            value=stats.held_blocks,
        )
        yield GaugeMetricFamily(
            "switchyard_kv_tier_cache_entries",
            "Block answers held in the tier lookup cache (at most kv_tier.cache_max_entries)",
            value=stats.cache_entries,
        )
