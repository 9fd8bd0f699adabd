"""Tier residency for routing: the lookup's cache and bounds, its metrics, and a gateway whose
decision changes once the shared KV tier (a real redis-server) holds the prompt's prefix."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import anyio
import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.kvtier import METRICS, OUTCOMES, TierCollector, TierResidency
from gateway.metricspec import naming_problems
from gateway.prefix import Blocks
from gateway.services import Services
from gateway.settings import KvTierSettings, Settings
from kvcache import hash_token_blocks
from kvcache.blockstore import RedisBlockStore, StoreStats
from kvcache.tier import TierNamespace, block_key, residency_namespace
from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.servers import wait_until
from tests.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeStore:
    """Holds a set of hashes; counts lookups; can hang or fail."""

    def __init__(self, held: set[int]) -> None:
        self.held = held
        self.calls: list[tuple[bytes, tuple[int, ...]]] = []
        self.hang = False
        self.fail = False
        self.errors = 0

    async def lookup(self, ns: TierNamespace, hashes: Sequence[int]) -> int:
        self.calls.append((ns.prefix, tuple(hashes)))
        if self.hang:
            await anyio.sleep(10)
        if self.fail:
            self.errors += 1
            return 0
        n = 0
        for h in hashes:
            if h not in self.held:
                break
            n += 1
        return n

    def record_failure(self) -> None:
        self.errors += 1

    def stats(self) -> StoreStats:
        return StoreStats(errors=self.errors)


def blocks(*hashes: int, mode: str = "tokens") -> Blocks:
    return Blocks(tuple(hashes), 16, mode)


def make(held: set[int], **kw: float) -> tuple[TierResidency, FakeStore, Clock]:
    settings = KvTierSettings(enabled=True, redis_url="redis://127.0.0.1:1/0", **kw)  # type: ignore[arg-type]
    store, clock = FakeStore(held), Clock()
    return TierResidency(settings, store, clock=clock), store, clock


@pytest.mark.anyio
async def test_leading_blocks_and_the_cache() -> None:
    tier, store, clock = make({1, 2, 3}, cache_ttl_s=2.0, miss_ttl_s=0.5)
    assert await tier.leading("m", blocks(1, 2, 3, 4)) == 3
    assert len(store.calls) == 1
    assert await tier.leading("m", blocks(1, 2, 3, 4)) == 3  # positives + the miss cached
    assert await tier.leading("m", blocks(1, 2)) == 2
    assert len(store.calls) == 1
    clock.t = 1.0  # the miss expired: ask only past the cached positives
    store.held.add(4)
    assert await tier.leading("m", blocks(1, 2, 3, 4, 5)) == 4
    assert store.calls[-1][1] == (4, 5)
    clock.t = 5.0  # everything expired
    assert await tier.leading("m", blocks(1, 2)) == 2
    assert store.calls[-1][1] == (1, 2)
    stats = tier.stats()
    assert (stats.cached, stats.fetched, stats.skipped) == (2, 3, 0)
    assert (stats.errors, stats.breaker, stats.timeouts) == (0, 0, 0)
    assert stats.held_blocks == 3 + 3 + 2 + 4 + 2
    assert stats.prompt_blocks == 4 + 4 + 2 + 5 + 2


@pytest.mark.anyio
async def test_block_sizes_and_modes() -> None:
    settings = KvTierSettings(enabled=True, redis_url="redis://x:1/0")
    store = FakeStore({7})
    tier = TierResidency(settings, store)
    assert await tier.leading("served", blocks(7)) == 1
    assert store.calls[-1][0] == residency_namespace("served", 16).prefix
    assert await tier.leading("other", Blocks((7,), 32, "tokens")) == 1
    assert store.calls[-1][0] == residency_namespace("other", 32).prefix
    assert await tier.leading("m", blocks(7, mode="bytes")) == 0  # never an engine's key
    assert await tier.leading("m", blocks()) == 0
    assert tier.stats().skipped == 2 and len(store.calls) == 2


@pytest.mark.anyio
async def test_errors_are_not_cached_as_misses() -> None:
    tier, store, _ = make({1}, cache_ttl_s=2.0, miss_ttl_s=2.0)
    store.fail = True
    assert await tier.leading("m", blocks(1)) == 0
    store.fail = False
    assert await tier.leading("m", blocks(1)) == 1  # asked again, not a cached miss
    assert len(store.calls) == 2


@pytest.mark.anyio
async def test_a_slow_lookup_is_cut_at_the_deadline() -> None:
    tier, store, _ = make({1, 2}, lookup_timeout_s=0.05, cache_ttl_s=5.0)
    assert await tier.leading("m", blocks(1)) == 1
    store.hang = True
    with anyio.fail_after(5):
        assert await tier.leading("m", blocks(1, 2)) == 1  # the cached block still counts
    stats = tier.stats()
    assert (stats.timeouts, stats.held_blocks, stats.prompt_blocks) == (1, 1 + 1, 1 + 2)


@pytest.mark.anyio
async def test_a_hung_redis_opens_the_breaker() -> None:
    """A server that accepts and never answers: the first lookup waits out the deadline
    (the store's own timeouts, equal to it, never fire first) and counts a failure, so the
    breaker opens and the next requests are not sent (no request waits on a dead Redis)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nothing reads or answers
        port = silent.getsockname()[1]
        settings = Settings.model_validate({"kv_tier": {
            "enabled": True, "redis_url": f"redis://127.0.0.1:{port}/0",
            "lookup_timeout_s": 0.1, "retry_s": 60.0}})  # fmt: skip
        tier = TierResidency.from_settings(settings)
        assert tier is not None
        try:
            with anyio.fail_after(10):
                for h in (1, 2, 3):
                    assert await tier.leading("m", blocks(h)) == 0
            stats = tier.stats()
            assert (stats.timeouts, stats.breaker) == (1, 2)
            assert (stats.store.errors, stats.store.skipped) == (1, 2)
        finally:
            await tier.aclose()


@pytest.mark.anyio
async def test_aclose_closes_the_pooled_connections(redis_server: RedisServer) -> None:
    settings = Settings.model_validate(
        {"kv_tier": {"enabled": True, "lookup_timeout_s": 0.5}, "redis_url": redis_server.url}
    )
    tier = TierResidency.from_settings(settings)
    assert tier is not None
    probe = redis.Redis.from_url(redis_server.url, socket_timeout=2.0)

    def clients() -> int:  # connected clients other than the probe itself
        return int(probe.info("clients")["connected_clients"]) - 1

    try:
        assert await tier.leading("m", blocks(1)) == 0
        assert clients() == 1
        await tier.aclose()
        assert wait_until(lambda: clients() == 0, timeout=10)
    finally:
        probe.close()


@pytest.mark.anyio
async def test_cache_is_bounded_and_ttl_zero_disables_it() -> None:
    tier, store, _ = make(set(range(100)), cache_max_entries=10)
    assert await tier.leading("m", blocks(*range(50))) == 50
    assert tier.stats().cache_entries == 10
    off, store2, _ = make({1}, cache_ttl_s=0.0, miss_ttl_s=0.0)
    for _ in range(3):
        assert await off.leading("m", blocks(1, 2)) == 1
    assert len(store2.calls) == 3 and off.stats().cache_entries == 0


@pytest.mark.anyio
async def test_against_a_real_redis(redis_server: RedisServer) -> None:
    settings = Settings.model_validate(
        {"kv_tier": {"enabled": True, "lookup_timeout_s": 0.5}, "redis_url": redis_server.url}
    )
    tier = TierResidency.from_settings(settings)
    assert tier is not None
    ids = list(range(100, 100 + 64))
    hashes = hash_token_blocks(ids, 16, model="m")
    writer = RedisBlockStore.from_url(redis_server.url)
    writer.put_many(residency_namespace("m", 16), [(h, 1024) for h in hashes[:3]], ttl_s=60)
    assert await tier.leading("m", Blocks(tuple(hashes), 16, "tokens")) == 3
    redis_server.stop()
    fresh = hash_token_blocks(list(range(7, 7 + 32)), 16, model="m")
    assert await tier.leading("m", Blocks(tuple(fresh), 16, "tokens")) == 0  # down: 0, at once
    assert tier.stats().store.errors == 1
    await tier.aclose()
    writer.close()
    assert TierResidency.from_settings(Settings()) is None


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[str, ...]], float]:
    """``{(sample name, label values): value}`` of the ``switchyard_kv_tier_`` samples."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("switchyard_kv_tier_") and not sample.name.endswith("_created")
    }


def test_the_metrics_follow_the_naming_rules() -> None:
    assert [p for spec in METRICS for p in naming_problems(spec)] == []
    assert {spec.subsystem for spec in METRICS} == {"kv_tier"}


@pytest.mark.anyio
async def test_metrics_move_with_lookups_on_a_real_redis(redis_server: RedisServer) -> None:
    """Each outcome and the block counters move as lookups happen: a round trip finding the
    blocks the engines wrote, the cache, byte blocks, then Redis down (an error, then the
    breaker without a round trip), read at scrape time from the app's registry."""
    settings = Settings.model_validate(
        {"kv_tier": {"enabled": True, "lookup_timeout_s": 0.5, "retry_s": 60.0},
         "redis_url": redis_server.url}
    )  # fmt: skip
    tier = TierResidency.from_settings(settings)
    assert tier is not None
    registry = CollectorRegistry()
    registry.register(TierCollector(tier))

    def requests(outcome: str) -> float:
        return scraped[("switchyard_kv_tier_lookup_requests_total", (outcome,))]

    scraped = _scrape(registry)
    assert [requests(o) for o in OUTCOMES] == [0.0] * len(OUTCOMES)
    assert scraped[("switchyard_kv_tier_held_blocks_total", ())] == 0
    ids = list(range(300, 300 + 5 * 16))
    hashes = tuple(hash_token_blocks(ids, 16, model="m"))  # 5 blocks, the first 3 held
    writer = RedisBlockStore.from_url(redis_server.url)
    writer.put_many(residency_namespace("m", 16), [(h, 1024) for h in hashes[:3]], ttl_s=60)
    writer.close()
    prompt = Blocks(hashes, 16, "tokens")
    assert await tier.leading("m", prompt) == 3  # a round trip
    scraped = _scrape(registry)
    assert requests("redis") == 1 and requests("cache") == 0
    assert scraped[("switchyard_kv_tier_prompt_blocks_total", ())] == 5
    assert scraped[("switchyard_kv_tier_held_blocks_total", ())] == 3
    assert scraped[("switchyard_kv_tier_cache_entries", ())] == 4  # 3 held + the first gap
    assert await tier.leading("m", prompt) == 3  # the cache alone
    assert await tier.leading("m", Blocks(hashes, 16, "bytes")) == 0  # never an engine's key
    scraped = _scrape(registry)
    assert (requests("redis"), requests("cache"), requests("skipped")) == (1, 1, 1)
    assert scraped[("switchyard_kv_tier_prompt_blocks_total", ())] == 10
    assert scraped[("switchyard_kv_tier_held_blocks_total", ())] == 6
    redis_server.stop()
    fresh = tuple(hash_token_blocks(list(range(9, 9 + 32)), 16, model="m"))
    assert await tier.leading("m", Blocks(fresh, 16, "tokens")) == 0  # fails: the breaker opens
    assert await tier.leading("m", Blocks(fresh, 16, "tokens")) == 0  # not asked
    scraped = _scrape(registry)
    assert (requests("error"), requests("breaker"), requests("timeout")) == (1, 1, 0)
    assert requests("redis") == 1  # the failures are no answers from Redis
    assert scraped[("switchyard_kv_tier_prompt_blocks_total", ())] == 10 + 2 + 2
    assert scraped[("switchyard_kv_tier_held_blocks_total", ())] == 6
    assert scraped[("switchyard_kv_tier_cache_entries", ())] == 4  # errors are not cached
    stats = tier.stats()
    assert (stats.store.errors, stats.store.skipped) == (1, 1)
    await tier.aclose()


def test_services_export_the_tier_only_when_enabled() -> None:
    def names(settings: Settings) -> set[str]:
        services = Services.build(settings)
        return {m.name for m in services.metrics.registry.collect()}

    on = Settings.model_validate(
        {"kv_tier": {"enabled": True}, "redis_url": "redis://127.0.0.1:9/0"}
    )
    assert "switchyard_kv_tier_lookup_requests" in names(on)  # lazy: nothing connects
    assert not any(n.startswith("switchyard_kv_tier_") for n in names(Settings()))


def _metrics(waiting: int) -> str:
    return (
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="fake-model"}} {waiting}\n'
    )


def test_gateway_spreads_once_the_tier_holds_the_prefix(
    redis_server: RedisServer,
    start_engines: StartEngines,
    start_gateway: StartGateway,
    client: httpx.Client,
) -> None:
    engines = start_engines(2)
    for engine, _ in engines:
        engine.metrics_text = _metrics(0)
    profile = {
        "filters": ["healthy", "serves-model"],
        # balance/placement off: only the cost of the prompt's prefill and the load count
        "scorers": [{"type": "prefix-cache", "balance_s": 0.0, "placement_s": 0.0}],
        "picker": "max-score",
    }
    gw = start_gateway(
        [srv.url for _, srv in engines],
        routing={"policy": "tier", "profiles": {"tier": profile}, "scrape_interval_s": 0.05},
        kv_tier={"enabled": True, "redis_url": redis_server.url, "lookup_timeout_s": 0.5,
                 "cache_ttl_s": 0.0, "miss_ttl_s": 0.0},
    )  # fmt: skip
    ids = list(range(1000, 1000 + 1024))  # 64 blocks of 16 tokens (token-id prompt: tokens mode)
    body = {"model": "fake-model", "prompt": ids, "max_tokens": 1}
    url = f"{gw.url}/v1/completions"

    def post() -> httpx.Response:
        resp = client.post(url, json=body)
        assert resp.status_code == 200, resp.text
        return resp

    first = post().headers["x-switchyard-endpoint"]
    owner = next(e for e, srv in engines if srv.url.endswith(first))
    other = next(srv.url.removeprefix("http://") for e, srv in engines if e is not owner)
    owner.metrics_text = _metrics(40)  # the owner is busy: 40 requests waiting
    needle = f'switchyard_endpoint_waiting_requests{{endpoint="{first}"}} 40.0'
    assert wait_until(lambda: needle in client.get(f"{gw.url}/metrics").text)
    # No tier: the owner's cached 1,024 tokens are worth more than its queue.
    again = post()
    assert again.headers["x-switchyard-endpoint"] == first
    assert "tier=0" in again.headers["x-switchyard-route"]
    # The tier now holds the prefix (what the engines' connector writes after saving it):
    # warm everywhere, so the idle engine wins.
    store = RedisBlockStore.from_url(redis_server.url)
    hashes = hash_token_blocks(ids, 16, model="fake-model")
    rns = residency_namespace("fake-model", 16)
    assert store.put_many(rns, [(h, 2_097_152) for h in hashes], ttl_s=60) == 64
    spread = post()
    assert spread.headers["x-switchyard-endpoint"] == other
    assert "tier=64" in spread.headers["x-switchyard-route"]
    # Redis down: the lookup answers 0 at once and requests are still served.
    store.close()
    redis_server.stop()
    down = post()
    assert "tier=0" in down.headers["x-switchyard-route"]
    assert block_key(rns, hashes[0]).startswith(rns.prefix)


def test_settings_need_a_url() -> None:
    with pytest.raises(ValueError, match="kv_tier.enabled needs"):
        Settings.model_validate({"kv_tier": {"enabled": True}})
    with pytest.raises(ValueError, match="kv_tier.redis_url"):
        Settings.model_validate({"kv_tier": {"enabled": True, "redis_url": "http://x"}})
    assert Settings.model_validate(
        {"kv_tier": {"enabled": True}, "redis_url": "redis://127.0.0.1:1/0"}
    ).kv_tier.enabled
