"""The block store against a real redis-server (and a real 3-shard Redis Cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import redis

from kvcache.blockstore import (
    AsyncRedisBlockStore,
    BlockRead,
    RedisBlockStore,
    StoreStats,
    _cluster_url,
    _RedisPy,
    load_outcome,
)
from kvcache.tier import HEADER, TierNamespace, block_key, encode_block, residency_namespace
from tests.redis_server import RedisServer
from tests.redis_topologies import RedisCluster

NS = TierNamespace(model="m", dtype="bfloat16", block_size=16, layout="test", hash_algo="sha256")
HASHES = [bytes([i]) * 32 for i in range(1, 9)]
PAYLOADS = [bytes([i]) * (1000 + i) for i in range(1, 9)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisBlockStore]:
    s = RedisBlockStore.from_url(redis_server.url, timeout_s=1.0)
    yield s
    s.close()


@pytest.mark.parametrize(
    ("present", "query", "expected"),
    [
        ([], [0, 1, 2], 0),
        ([0, 1, 2], [], 0),
        ([0, 1, 2], [0, 1, 2], 3),
        ([0, 1, 2], [0, 1, 2, 3, 4], 3),
        ([0, 2, 3], [0, 1, 2, 3], 1),  # a gap ends the prefix
        ([1, 2], [0, 1, 2], 0),
        (list(range(8)), list(range(8)), 8),
    ],
)
def test_lookup_counts_leading_blocks(
    store: RedisBlockStore, present: list[int], query: list[int], expected: int
) -> None:
    store.put_many(NS, [(HASHES[i], PAYLOADS[i]) for i in present], ttl_s=60)
    assert store.lookup(NS, [HASHES[i] for i in query]) == expected
    assert store.stats().lookup_hit_blocks == expected


class CountingConnection(redis.Connection):
    sends = 0

    def send_packed_command(self, command: object, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("op", ["lookup", "get_many", "put_many"])
def test_one_round_trip_per_batch(redis_server: RedisServer, raw: redis.Redis, op: str) -> None:
    pool = redis.ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    client.ping()  # connect (the handshake sends too)
    store = RedisBlockStore(client)
    items = list(zip(HASHES, PAYLOADS, strict=True))
    if op != "put_many":
        store.put_many(NS, items, ttl_s=60)
    raw.config_resetstat()
    CountingConnection.sends = 0
    if op == "lookup":
        assert store.lookup(NS, HASHES) == 8
    elif op == "get_many":
        assert store.get_many(NS, HASHES) == PAYLOADS
    else:
        assert store.put_many(NS, items, ttl_s=60) == 8
    assert CountingConnection.sends == 1  # the whole batch in one write, then one read
    command = {"lookup": "exists", "get_many": "get", "put_many": "set"}[op]
    stats = cast(dict[str, dict[str, int]], raw.info("commandstats"))
    assert stats[f"cmdstat_{command}"]["calls"] == 8
    client.close()


def test_round_trip_and_accounting(store: RedisBlockStore) -> None:
    assert store.put_many(NS, list(zip(HASHES, PAYLOADS, strict=True)), ttl_s=60) == 8
    assert store.get_many(NS, HASHES) == PAYLOADS
    stats = store.stats()
    assert stats.puts == 8 and stats.hits == 8 and stats.misses == 0
    assert stats.bytes_fetched == sum(map(len, PAYLOADS))
    assert stats.bytes_stored == sum(map(len, PAYLOADS)) + 8 * HEADER


def test_int_hashes_and_empty_batches(store: RedisBlockStore) -> None:
    assert store.put_many(NS, [(7, b"seven")], ttl_s=60) == 1
    assert store.get_many(NS, [7, 8]) == [b"seven", None]
    assert store.get_many(NS, []) == []
    assert store.put_many(NS, [], ttl_s=60) == 0
    assert store.stats().lookups == 0  # an empty lookup sends nothing


def test_eviction_between_lookup_and_load(store: RedisBlockStore, raw: redis.Redis) -> None:
    store.put_many(NS, list(zip(HASHES[:4], PAYLOADS[:4], strict=True)), ttl_s=60)
    assert store.lookup(NS, HASHES[:4]) == 4
    raw.delete(block_key(NS, HASHES[2]))  # what allkeys-lru does under memory pressure
    assert store.get_many(NS, HASHES[:4]) == [PAYLOADS[0], PAYLOADS[1], None, PAYLOADS[3]]
    stats = store.stats()
    assert stats.misses == 1 and stats.corrupt == 0 and stats.hits == 3


@pytest.mark.parametrize(
    "value",
    [
        b"garbage",
        encode_block(NS, HASHES[0], PAYLOADS[0])[:-1] + b"\x00",  # checksum
        encode_block(NS, HASHES[1], PAYLOADS[0]),  # another block's value
        encode_block(TierNamespace(model="other", block_size=16), HASHES[0], PAYLOADS[0]),
    ],
    ids=["garbage", "checksum", "other block", "other namespace"],
)
def test_corrupt_or_mismatched_value_is_a_miss(
    store: RedisBlockStore, raw: redis.Redis, value: bytes
) -> None:
    raw.set(block_key(NS, HASHES[0]), value)
    assert store.get_many(NS, HASHES[:1]) == [None]
    assert store.stats().corrupt == 1
    assert store.lookup(NS, HASHES[:1]) == 1  # EXISTS cannot tell; the load finds out


def test_size_only_values(store: RedisBlockStore, raw: redis.Redis) -> None:
    rns = residency_namespace("m", 16)
    assert store.put_many(rns, [(11, 2_949_120), (12, 2_949_120)], ttl_s=60) == 2
    assert store.lookup(rns, [11, 12, 13]) == 2
    assert store.get_many(rns, [11]) == [None]  # a reader wanting bytes: a miss
    stats = store.stats()
    assert stats.misses == 1 and stats.corrupt == 0
    assert stats.bytes_stored == 2 * HEADER
    assert len(cast(bytes, raw.get(block_key(rns, 11)))) == HEADER


def test_ttl_is_set(store: RedisBlockStore, raw: redis.Redis) -> None:
    store.put_many(NS, [(HASHES[0], PAYLOADS[0])], ttl_s=120.4)
    assert 110 <= cast(int, raw.ttl(block_key(NS, HASHES[0]))) <= 120
    store.put_many(NS, [(HASHES[1], PAYLOADS[1])], ttl_s=0.1)
    assert raw.ttl(block_key(NS, HASHES[1])) == 1  # never 0 (EX 0 is an error)


def test_nx_keeps_the_first_writer(store: RedisBlockStore) -> None:
    assert store.put_many(NS, [(HASHES[0], b"first")], ttl_s=60) == 1
    assert store.put_many(NS, [(HASHES[0], b"second"), (HASHES[1], b"x")], ttl_s=60) == 1
    assert store.get_many(NS, HASHES[:2]) == [b"first", b"x"]
    assert store.stats().put_existing == 1


def test_redis_down_is_a_miss_not_a_crash(redis_server: RedisServer) -> None:
    clock = Clock()
    store = RedisBlockStore.from_url(redis_server.url, timeout_s=0.5, retry_s=5.0, clock=clock)
    store.put_many(NS, [(HASHES[0], PAYLOADS[0])], ttl_s=60)
    redis_server.stop()
    assert store.lookup(NS, HASHES[:1]) == 0
    assert store.get_many(NS, HASHES[:2]) == [None, None]  # breaker open: not sent
    assert store.put_many(NS, [(HASHES[1], b"x")], ttl_s=60) == 0
    stats = store.stats()
    assert stats.errors == 1 and stats.skipped == 2 and stats.misses == 2
    clock.t = 5.0  # breaker half-open: the next call tries again
    assert store.put_many(NS, [(HASHES[1], b"x")], ttl_s=60) == 0
    assert store.get_many(NS, HASHES[:1]) == [None]  # open again: skipped
    stats = store.stats()
    assert stats.errors == 2 and stats.skipped == 3 and stats.puts == 1
    clock.t = 10.0
    assert store.get_many(NS, HASHES[:1]) == [None]
    assert store.stats().errors == 3
    redis_server.start()  # an empty server on the same port
    clock.t = 15.0
    assert store.put_many(NS, [(HASHES[1], b"x")], ttl_s=60) == 1
    assert store.lookup(NS, HASHES[1:2]) == 1
    store.close()


def test_declines_are_counted(store: RedisBlockStore) -> None:
    store.record_decline(3)
    store.record_decline(2)
    assert store.stats() == StoreStats(declines=2, declined_blocks=5)


@pytest.mark.anyio
async def test_async_store(redis_server: RedisServer) -> None:
    clock = Clock()
    store = AsyncRedisBlockStore.from_url(redis_server.url, timeout_s=0.5, clock=clock)
    assert await store.lookup(NS, []) == 0
    assert await store.get_many(NS, []) == []
    assert await store.put_many(NS, [], ttl_s=60) == 0
    assert await store.put_many(NS, list(zip(HASHES[:3], PAYLOADS[:3], strict=True)), ttl_s=60) == 3
    assert await store.put_many(NS, [(HASHES[0], b"late")], ttl_s=60) == 0
    assert await store.lookup(NS, [*HASHES[:2], HASHES[5], HASHES[2]]) == 2
    assert await store.get_many(NS, HASHES[:4]) == [*PAYLOADS[:3], None]
    redis_server.stop()
    assert await store.lookup(NS, HASHES[:1]) == 0
    assert await store.get_many(NS, HASHES[:1]) == [None]
    assert await store.put_many(NS, [(HASHES[4], b"x")], ttl_s=60) == 0
    clock.t = 2.0
    assert await store.get_many(NS, HASHES[:1]) == [None]
    clock.t = 4.0
    assert await store.put_many(NS, [(HASHES[4], b"x")], ttl_s=60) == 0
    stats = store.stats()
    assert stats.errors == 3 and stats.skipped == 2
    assert stats.hits == 3 and stats.puts == 3 and stats.put_existing == 1
    await store.aclose()


def test_cluster_spreads_blocks_over_shards() -> None:
    with RedisCluster() as cluster:
        store = RedisBlockStore.from_url(cluster.url, timeout_s=2.0)
        hashes = list(range(1, 49))
        items = [(h, h.to_bytes(4, "big") * 100) for h in hashes]
        assert store.put_many(NS, items, ttl_s=60) == 48
        nodes = {cluster.node_for_slot(cluster.keyslot(block_key(NS, h).decode())) for h in hashes}
        assert nodes == {0, 1, 2}  # no hash tag: every shard holds part of the prefix
        assert store.lookup(NS, [*hashes, 99]) == 48
        assert store.get_many(NS, [*hashes[:3], 99]) == [p for _, p in items[:3]] + [None]
        store.close()


@pytest.mark.anyio
async def test_async_cluster() -> None:
    with RedisCluster() as cluster:
        store = AsyncRedisBlockStore.from_url(cluster.url, timeout_s=2.0)
        items = [(h, b"v%d" % h) for h in range(1, 25)]
        assert await store.put_many(NS, items, ttl_s=60) == 24
        assert await store.lookup(NS, [h for h, _ in items]) == 24
        assert await store.get_many(NS, [1, 2, 99]) == [b"v1", b"v2", None]
        await store.aclose()


def test_read_many_hands_verified_views(store: RedisBlockStore, raw: redis.Redis) -> None:
    store.put_many(NS, list(zip(HASHES[:3], PAYLOADS[:3], strict=True)), ttl_s=60)
    raw.set(block_key(NS, HASHES[1]), b"corrupt")
    got: dict[int, bytes] = {}

    def sink(i: int, view: memoryview) -> None:
        got[i] = bytes(view)

    assert store.read_many(NS, [*HASHES[:3], HASHES[7]], sink) == [True, False, True, False]
    assert got == {0: PAYLOADS[0], 2: PAYLOADS[2]}
    assert store.read_many(NS, [], sink) == []
    stats = store.stats()
    assert stats.hits == 2 and stats.misses == 2 and stats.corrupt == 1
    assert stats.bytes_fetched == len(PAYLOADS[0]) + len(PAYLOADS[2])


def test_read_many_when_redis_is_down(redis_server: RedisServer) -> None:
    clock = Clock()
    store = RedisBlockStore.from_url(redis_server.url, timeout_s=0.5, clock=clock)
    redis_server.stop()
    assert store.read_many(NS, HASHES[:2], lambda i, v: None) == [False, False]
    assert store.read_many(NS, HASHES[:2], lambda i, v: None) == [False, False]  # skipped
    stats = store.stats()
    assert stats.errors == 1 and stats.skipped == 1 and stats.misses == 4
    store.close()


def test_redis_py_path_refuses_unexpected_replies(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.set("k", "v")
    with pytest.raises(TypeError, match="unexpected reply"):
        _RedisPy(client).pipeline([(b"KEYS", b"*")], lambda i, r: r)
    client.close()


def _load_and_forget(store: RedisBlockStore, raw: redis.Redis, hashes: list[bytes]) -> int:
    """What the vLLM connector's worker does with a load (kvcache/vllm_connector.py
    ``_load``): read the chain, keep its leading hits, delete the keys load_outcome names."""

    def sink(i: int, view: memoryview) -> bool:
        return len(view) != len(PAYLOADS[5])  # refuses block 5: "not its block size"

    loaded, bad = load_outcome(store.read_blocks(NS, hashes, sink))
    if bad:
        raw.delete(*(block_key(NS, hashes[i]) for i in bad))
    return loaded


def _present(raw: redis.Redis, hashes: list[bytes]) -> list[bool]:
    return [bool(raw.exists(block_key(NS, h))) for h in hashes]


def test_read_blocks_tells_miss_bad_and_hit(store: RedisBlockStore, raw: redis.Redis) -> None:
    store.put_many(NS, list(zip(HASHES[:7], PAYLOADS[:7], strict=True)), ttl_s=60)
    raw.set(block_key(NS, HASHES[2]), b"corrupt")
    raw.delete(block_key(NS, HASHES[3]))
    raw.set(block_key(NS, HASHES[4]), raw.get(block_key(NS, HASHES[0])) or b"")  # mismatched
    got: list[int] = []

    def sink(i: int, view: memoryview) -> bool:
        got.append(i)
        return i != 5  # the caller refuses block 5

    reads = store.read_blocks(NS, HASHES[:7], sink)
    H, M, B = BlockRead.HIT, BlockRead.MISS, BlockRead.BAD
    assert reads == [H, H, B, M, B, B, H]
    assert got == [0, 1, 5, 6]
    assert load_outcome(reads) == (2, [2, 4, 5])
    stats = store.stats()
    assert stats.hits == 3 and stats.misses == 4 and stats.corrupt == 3
    assert stats.bytes_fetched == sum(len(PAYLOADS[i]) for i in (0, 1, 6))


def test_load_deletes_only_values_read_bad(store: RedisBlockStore, raw: redis.Redis) -> None:
    store.put_many(NS, list(zip(HASHES[:7], PAYLOADS[:7], strict=True)), ttl_s=60)
    raw.set(block_key(NS, HASHES[2]), b"corrupt")
    raw.delete(block_key(NS, HASHES[3]))
    assert _load_and_forget(store, raw, HASHES[:7]) == 2
    # The corrupt one and the refused one are gone; the blocks after the gap that came back
    # fine stay for the next load (and for every other engine).
    assert _present(raw, HASHES[:7]) == [True, True, False, False, True, False, True]


def test_load_with_the_breaker_open_deletes_nothing(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    store = RedisBlockStore.from_url(redis_server.url, timeout_s=1.0, clock=Clock())
    store.put_many(NS, list(zip(HASHES[:4], PAYLOADS[:4], strict=True)), ttl_s=60)
    store.record_failure()  # an earlier failure: the breaker is open, nothing is read
    assert store.read_blocks(NS, HASHES[:4], lambda i, v: True) == [BlockRead.FAILED] * 4
    assert _load_and_forget(store, raw, HASHES[:4]) == 0
    assert _present(raw, HASHES[:4]) == [True] * 4
    assert store.stats().skipped == 2
    store.close()


def test_load_that_times_out_deletes_nothing(redis_server: RedisServer, raw: redis.Redis) -> None:
    store = RedisBlockStore.from_url(redis_server.url, timeout_s=0.2)
    store.put_many(NS, list(zip(HASHES[:4], PAYLOADS[:4], strict=True)), ttl_s=60)
    raw.execute_command("CLIENT", "PAUSE", "5000", "ALL")  # the store's GETs time out
    try:
        assert store.read_blocks(NS, HASHES[:4], lambda i, v: True) == [BlockRead.FAILED] * 4
        assert load_outcome([BlockRead.FAILED] * 4) == (0, [])
    finally:
        raw.execute_command("CLIENT", "UNPAUSE")
    assert _present(raw, HASHES[:4]) == [True] * 4
    assert store.stats().errors == 1
    store.close()


def test_load_with_redis_down_deletes_nothing(redis_server: RedisServer) -> None:
    store = RedisBlockStore.from_url(redis_server.url, timeout_s=0.5)
    redis_server.stop()
    reads = store.read_blocks(NS, HASHES[:3], lambda i, v: True)
    assert reads == [BlockRead.FAILED] * 3
    assert load_outcome(reads) == (0, [])
    store.close()


@pytest.mark.parametrize(
    ("url", "nodes", "username", "password"),
    [
        (
            "redis+cluster://n1:7000,n2:7001,n3",
            [("n1", 7000), ("n2", 7001), ("n3", 6379)],
            None,
            None,
        ),
        ("redis+cluster://:s3cret@n1:7000,n2:7001", [("n1", 7000), ("n2", 7001)], None, "s3cret"),
        ("redis+cluster://kv:pw@n1:1", [("n1", 1)], "kv", "pw"),
        ("redis+cluster://kv:p%40ss%3Aw@n1:1", [("n1", 1)], "kv", "p@ss:w"),  # percent-decoded
        ("redis+cluster://kv@n1:1", [("n1", 1)], "kv", None),  # a lone name is a user
    ],
)
def test_cluster_url_keeps_the_credentials(
    url: str, nodes: list[tuple[str, int]], username: str | None, password: str | None
) -> None:
    assert _cluster_url(url) == (nodes, username, password)


@pytest.mark.anyio
async def test_async_cluster_store_is_given_the_credentials() -> None:
    """The async cluster client connects on first use: its connection settings are checked
    without a cluster (the sync client and the deleter get the same two arguments)."""
    store = AsyncRedisBlockStore.from_url("redis+cluster://kv:pw@127.0.0.1:1", timeout_s=0.1)
    kwargs = store._client.connection_kwargs  # type: ignore[union-attr]
    assert (kwargs["username"], kwargs["password"]) == ("kv", "pw")
    await store.aclose()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"max_connections": -2}, "max_connections must be at least 1"),
        ({"max_connections": "4"}, "max_connections must be an integer"),
        ({"retry_s": -1.0}, "retry_s must be 0 or more"),
        ({"retry_s": float("nan")}, "retry_s must be 0 or more"),
    ],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unusable_pool_or_breaker_settings_are_refused(
    kind: str, kwargs: dict[str, object], match: str
) -> None:
    """The vLLM connector builds its stores from kv_connector_extra_config at start-up: a
    pool of no connections or a negative breaker window fails there, saying which."""
    cls = RedisBlockStore if kind == "sync" else AsyncRedisBlockStore
    with pytest.raises(ValueError, match=match):
        cls.from_url("redis://127.0.0.1:1/0", **kwargs)  # type: ignore[arg-type]


def test_retry_s_zero_is_accepted(redis_server: RedisServer) -> None:
    RedisBlockStore.from_url(redis_server.url, retry_s=0.0, max_connections=1).close()
