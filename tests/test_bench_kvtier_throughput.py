"""benchmarks/kvtier/throughput.py on a tiny block: every measurement runs, every key it wrote
is gone afterwards (no timing is asserted)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from benchmarks.kvtier.throughput import (
    Block,
    _lmcache_prefix_redispy,
    _lmcache_prefix_resp,
    _ours_prefix,
    _paired_round,
    _redis_benchmark,
)
from kvcache.blockstore import RedisBlockStore
from kvcache.resp import RespClient
from kvcache.tier import TierNamespace
from tests.redis_server import RedisServer

TINY = Block("tiny", 65_536, 16)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-benchmark") is None, reason="redis-benchmark (redis-tools) missing"
)


def _dbsize(admin: RespClient) -> int:
    (n,) = admin.pipeline([(b"DBSIZE",)], lambda _i, r: r)
    assert isinstance(n, int)
    return n


def test_every_part_measures_and_cleans_up(redis_server: RedisServer) -> None:
    store = RedisBlockStore.from_url(redis_server.url, max_connections=1, timeout_s=10.0)
    admin = RespClient.from_url(redis_server.url, max_connections=1, timeout_s=10.0)
    serial = iter(range(1, 1 << 40))
    ns = TierNamespace(model="tiny", block_size=16, layout="bench")
    rate, cpu = _redis_benchmark(redis_server.port, TINY.block_bytes, "set", 1, 0.01)
    assert rate > 0 and cpu >= 0
    paired = _paired_round(store, admin, redis_server.port, ns, TINY, 0.01, serial)
    for name in ("get1", "read1", "put1", "get8", "read8", "put8"):
        assert paired[f"store_{name}"] > 0 and paired[f"ratio_{name}"] > 0
        assert paired[f"store_{name}_cpu_us"] >= 0
    assert _dbsize(admin) == 0
    ours = _ours_prefix(store, admin, ns, TINY, 0.01, serial)
    lmc = _lmcache_prefix_resp(admin, TINY, 0.01, serial)
    lmc_py = asyncio.run(_lmcache_prefix_redispy(redis_server.url, TINY, 0.01, serial))
    for result in (ours, lmc, lmc_py):
        assert set(result) == {"load", "save"} and min(result.values()) > 0
    assert _dbsize(admin) == 0
    stats = store.stats()
    assert stats.errors == 0 and stats.corrupt == 0 and stats.hits > 0
    store.close()
    admin.close()
