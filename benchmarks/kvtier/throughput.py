"""Tier throughput: the block store's GET/PUT GiB/s against redis-benchmark and LMCache's layout.

``run_throughput(quick)`` starts its own ``redis-server`` (loopback, no persistence) and, for
one engine block of each size (SmolLM2-135M on CPU: 30 layers x 128 tokens = 2,949,120 bytes;
Llama-3-8B on a GPU: 16 tokens x 128 KiB = 2 MiB), measures in the same process on the same
machine:

* ``redis-benchmark -t set,get -d SIZE -c 1`` with ``-P 1`` and ``-P 8`` (one connection,
  the same value size; its GET reads into its own buffer and discards the value);
* the store (:class:`kvcache.blockstore.RedisBlockStore`, one connection): ``put_many`` of 1
  and of 8 fresh blocks (``SET NX EX``; the keys are deleted between calls, untimed),
  ``get_many`` (decoded ``bytes``, the protocol's return) and ``read_many`` (zero-copy: each
  verified block copied into a preallocated buffer, the KV cache's stand-in) of 1 and of 8.

Each metric is measured ``rounds`` times, interleaved with redis-benchmark, and the median is
reported; the GET ratio (store / redis-benchmark at the same pipelining) is the median of
the per-round ratios, so machine-load drift cancels out. The target is >= 0.8.

**LMCache's Redis layout** (lmcache 0.5.6 ``RedisConnector``: two keys per 256-token chunk,
``<key>kv_bytes`` and ``<key>metadata``; ``contains`` = one EXISTS round trip per chunk,
sequential; a load = GET metadata then GET kv_bytes per chunk, copied into the memory object;
a save = SET kv_bytes then SET metadata) is reproduced here, because lmcache does not install
with a CPU torch (hard dependencies on ``cupy-cuda13x``, ``cufile-python``, ``nvtx`` and a
compiled ``cuda_ops`` extension; checked with ``pip download lmcache --no-deps``). It runs
with redis-py's ``redis.asyncio`` client (LMCache's own; pure-Python parser here, no
hiredis) and with the store's own client (``RespClient``), so layout and client show
separately. Both sides load and save the same 1,024-token prefix into preallocated memory.
"""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from benchmarks.routing.launch import start_redis
from gateway.kvtier import TierResidency
from gateway.prefix import Blocks
from gateway.settings import Settings
from kvcache import hash_token_blocks
from kvcache.blockstore import RedisBlockStore
from kvcache.resp import RespClient
from kvcache.tier import TierNamespace, block_key, residency_namespace

__all__ = ["BLOCKS", "run_throughput"]

GIB = 2**30
PREFIX_TOKENS = 1024
LMCACHE_CHUNK_TOKENS = 256
LMCACHE_METADATA = bytes(28)  # RemoteMetadata: length, shapes, dtypes, format (small)


@dataclass(frozen=True, slots=True)
class Block:
    name: str
    block_bytes: int
    block_tokens: int

    @property
    def bytes_per_token(self) -> int:
        return self.block_bytes // self.block_tokens


BLOCKS = (
    Block("smollm2-cpu", 2_949_120, 128),  # 30 layers x 3 heads x 128 tokens x 128 (K|V) x bf16
    Block(
        "llama3-8b-gpu", 2 * 2**20, 16
    ),  # 16 tokens x 128 KiB (32 layers x 8 heads x 128 x 2 x 2)
)


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3) if xs else 0.0


class _Timer:
    """Accumulates only the timed sections of a loop (wall and this process's CPU), until
    ``budget_s`` of wall time; ``values`` counts the blocks moved."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.spent, self.cpu, self.nbytes, self.values = budget_s, 0.0, 0.0, 0, 0

    def run(self, step: Callable[[], int], untimed: Callable[[], None] | None = None) -> float:
        while self.spent < self.budget_s:
            c0, t0 = time.process_time(), time.perf_counter()
            self.nbytes += step()
            self.spent += time.perf_counter() - t0
            self.cpu += time.process_time() - c0
            self.values += 1
            if untimed is not None:
                untimed()
        return self.nbytes / self.spent / GIB


def _redis_benchmark(
    port: int, size: int, test: str, pipeline: int, seconds: float
) -> tuple[float, float]:
    """``redis-benchmark -t TEST -d SIZE -c 1 -P PIPELINE``: GiB/s of values and its client's
    CPU microseconds per value (from this process's reaped-children rusage)."""
    n = max(8 * pipeline, int(seconds * 0.8 * GIB / size))
    argv = ["redis-benchmark", "-p", str(port), "-t", test, "-d", str(size), "-c", "1",
            "-n", str(n), "-P", str(pipeline), "--csv"]  # fmt: skip
    for attempt in range(3):  # it exits 1 now and then on this loaded machine: retry, bounded
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)  # noqa: S603
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode == 0 and len(out.stdout.splitlines()) > 1:
            break
        if attempt == 2:
            raise RuntimeError(f"redis-benchmark failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    line = out.stdout.splitlines()[1]
    rps = float(line.split(",")[1].strip('"'))
    return rps * size / GIB, cpu / n * 1e6


def _unlink(admin: RespClient, keys: list[bytes]) -> None:
    if keys:
        admin.pipeline([(b"UNLINK", *keys)], _ignore)


def _paired_round(
    store: RedisBlockStore,
    admin: RespClient,
    port: int,
    ns: TierNamespace,
    block: Block,
    seconds: float,
    serial: Iterator[int],
) -> dict[str, float]:
    """One round: each store metric right after redis-benchmark's at the same pipelining
    (GET: the store's ``get_many`` and ``read_many`` of 1 and 8 blocks against ``-P 1`` and
    ``-P 8``; PUT: ``put_many`` of 1 and 8 fresh blocks against SET), so load drift between
    the two sides of a ratio is small. Values are GiB/s and client CPU us per value."""
    size = block.block_bytes
    payload = os.urandom(size)
    resident = [next(serial) for _ in range(8)]
    store.put_many(ns, [(h, payload) for h in resident], ttl_s=600)
    dest = bytearray(size)

    def sink(_i: int, view: memoryview) -> None:
        dest[: len(view)] = view  # the KV cache's stand-in: one copy out of the receive buffer

    out: dict[str, float] = {}

    def record(name: str, timer: _Timer, rate: float) -> None:
        out[f"store_{name}"] = rate
        out[f"store_{name}_cpu_us"] = timer.cpu / max(1, timer.nbytes // size) * 1e6

    for batch in (1, 8):
        hashes = resident[:batch]
        admin.pipeline([(b"SET", b"key:__rand_int__", payload)], _ignore)
        rb_get, rb_get_cpu = _redis_benchmark(port, size, "get", batch, seconds)
        out[f"redis_benchmark_get_p{batch}"] = rb_get
        out[f"redis_benchmark_get_p{batch}_cpu_us"] = rb_get_cpu

        def get(hashes: list[int] = hashes) -> int:
            return sum(len(p) for p in store.get_many(ns, hashes) if p is not None)

        def read(hashes: list[int] = hashes) -> int:
            return size * sum(store.read_many(ns, hashes, sink))

        timer = _Timer(seconds)
        record(f"get{batch}", timer, timer.run(get))
        timer = _Timer(seconds)
        record(f"read{batch}", timer, timer.run(read))
        out[f"ratio_get{batch}"] = out[f"store_get{batch}"] / rb_get
        out[f"ratio_read{batch}"] = out[f"store_read{batch}"] / rb_get

        rb_set, rb_set_cpu = _redis_benchmark(port, size, "set", batch, seconds)
        out[f"redis_benchmark_set_p{batch}"] = rb_set
        out[f"redis_benchmark_set_p{batch}_cpu_us"] = rb_set_cpu
        fresh: list[int] = []

        def put(batch: int = batch, fresh: list[int] = fresh) -> int:
            fresh[:] = [next(serial) for _ in range(batch)]
            return size * store.put_many(ns, [(h, payload) for h in fresh], ttl_s=60)

        def drop(fresh: list[int] = fresh) -> None:
            _unlink(admin, [block_key(ns, h) for h in fresh])

        timer = _Timer(seconds)
        record(f"put{batch}", timer, timer.run(put, drop))
        out[f"ratio_put{batch}"] = out[f"store_put{batch}"] / rb_set
    _unlink(admin, [block_key(ns, h) for h in resident] + [b"key:__rand_int__"])
    return out


def _ignore(_i: int, _reply: object) -> None:
    return None


def _ours_prefix(
    store: RedisBlockStore,
    admin: RespClient,
    ns: TierNamespace,
    block: Block,
    seconds: float,
    serial: Iterator[int],
) -> dict[str, float]:
    """Our layout: one key per block; a load = 1 pipelined EXISTS + 1 pipelined GET."""
    nblocks = PREFIX_TOKENS // block.block_tokens
    payloads = [os.urandom(block.block_bytes) for _ in range(min(nblocks, 8))]
    hashes = [next(serial) for _ in range(nblocks)]
    items = [(h, payloads[i % len(payloads)]) for i, h in enumerate(hashes)]
    store.put_many(ns, items, ttl_s=600)
    kv = bytearray(nblocks * block.block_bytes)  # the "KV cache" the prefix is loaded into
    view = memoryview(kv)

    def sink(i: int, payload: memoryview) -> None:
        view[i * block.block_bytes : (i + 1) * block.block_bytes] = payload

    def load() -> int:
        n = store.lookup(ns, hashes)
        return block.block_bytes * sum(store.read_many(ns, hashes[:n], sink))

    fresh: list[int] = []

    def save() -> int:
        fresh[:] = [next(serial) for _ in hashes]
        written = store.put_many(
            ns, [(h, p) for h, (_, p) in zip(fresh, items, strict=True)], ttl_s=60
        )
        return written * block.block_bytes

    def drop() -> None:
        _unlink(admin, [block_key(ns, h) for h in fresh])

    result = {"load": _Timer(seconds).run(load), "save": _Timer(seconds).run(save, drop)}
    drop()
    fresh[:] = hashes
    drop()
    return result


def _lmcache_prefix_resp(
    client: RespClient, block: Block, seconds: float, serial: Iterator[int]
) -> dict[str, float]:
    """LMCache's layout over our client: per chunk EXISTS, GET metadata, GET kv_bytes."""
    chunk = LMCACHE_CHUNK_TOKENS * block.bytes_per_token
    nchunks = PREFIX_TOKENS // LMCACHE_CHUNK_TOKENS
    data = os.urandom(chunk)
    keys = [b"lmc:%d:" % next(serial) for _ in range(nchunks)]
    for key in keys:
        client.pipeline([(b"SET", key + b"kv_bytes", data)], _ignore)
        client.pipeline([(b"SET", key + b"metadata", LMCACHE_METADATA)], _ignore)
    memory = bytearray(nchunks * chunk)
    view = memoryview(memory)

    def load() -> int:
        hits = 0
        for key in keys:  # batched_async_contains: one EXISTS round trip per chunk
            if not client.pipeline([(b"EXISTS", key + b"metadata")], lambda _i, r: r)[0]:
                break
            hits += 1
        got = 0
        for i, key in enumerate(keys[:hits]):
            if client.pipeline([(b"GET", key + b"metadata")], lambda _i, r: r is not None)[0]:

                def copy(_i: int, reply: object, i: int = i) -> int:
                    assert isinstance(reply, memoryview)
                    view[i * chunk : i * chunk + len(reply)] = reply
                    return len(reply)

                got += client.pipeline([(b"GET", key + b"kv_bytes")], copy)[0]
        return got

    fresh: list[bytes] = []

    def save() -> int:
        fresh[:] = [b"lmc:%d:" % next(serial) for _ in range(nchunks)]
        for key in fresh:
            client.pipeline([(b"SET", key + b"kv_bytes", data)], _ignore)
            client.pipeline([(b"SET", key + b"metadata", LMCACHE_METADATA)], _ignore)
        return nchunks * chunk

    def drop() -> None:
        _unlink(client, [k + s for k in fresh for s in (b"kv_bytes", b"metadata")])

    result = {"load": _Timer(seconds).run(load), "save": _Timer(seconds).run(save, drop)}
    fresh[:] = keys
    drop()
    return result


async def _lmcache_prefix_redispy(
    url: str, block: Block, seconds: float, serial: Iterator[int]
) -> dict[str, float]:
    """LMCache's layout with LMCache's client (redis.asyncio), as its RedisConnector does."""
    chunk = LMCACHE_CHUNK_TOKENS * block.bytes_per_token
    nchunks = PREFIX_TOKENS // LMCACHE_CHUNK_TOKENS
    data = os.urandom(chunk)
    conn = aioredis.Redis.from_pool(aioredis.ConnectionPool.from_url(url, max_connections=150))
    keys = [f"lmc:{next(serial)}:" for _ in range(nchunks)]
    for key in keys:
        await conn.set(key + "kv_bytes", data)
        await conn.set(key + "metadata", LMCACHE_METADATA)
    memory = bytearray(nchunks * chunk)
    view = memoryview(memory)

    async def load() -> int:
        hits = 0
        for key in keys:
            if not await conn.exists(key + "metadata"):
                break
            hits += 1
        got = 0
        for i, key in enumerate(keys[:hits]):
            if await conn.get(key + "metadata") is None:
                break
            kv = await conn.get(key + "kv_bytes")
            view[i * chunk : i * chunk + len(kv)] = kv
            got += len(kv)
        return got

    fresh: list[str] = []

    async def save() -> int:
        fresh[:] = [f"lmc:{next(serial)}:" for _ in range(nchunks)]
        for key in fresh:
            await conn.set(key + "kv_bytes", data)
            await conn.set(key + "metadata", LMCACHE_METADATA)
        return nchunks * chunk

    async def timed(step: Callable[[], Any], after: Callable[[], Any] | None) -> float:
        spent, nbytes = 0.0, 0
        while spent < seconds:
            t0 = time.perf_counter()
            nbytes += await step()
            spent += time.perf_counter() - t0
            if after is not None:
                await after()
        return nbytes / spent / GIB

    async def drop() -> None:
        await conn.unlink(*(k + s for k in fresh for s in ("kv_bytes", "metadata")))

    try:
        result = {"load": await timed(load, None), "save": await timed(save, drop)}
        fresh[:] = keys
        await drop()
    finally:
        await conn.aclose()
    return result


async def _residency_lookup_cost(url: str, samples: int) -> dict[str, float]:
    """The gateway's tier-residency lookup (gateway/kvtier.py): CPU microseconds per call on
    the event loop and wall p50, uncached (one Lua round trip) and cached, 8 and 64 blocks."""
    out: dict[str, float] = {}
    writer = RedisBlockStore.from_url(url)
    for cache_ttl in (0.0, 2.0):
        settings = Settings.model_validate(
            {"redis_url": url, "kv_tier": {"enabled": True, "lookup_timeout_s": 1.0,
                                           "cache_ttl_s": cache_ttl, "miss_ttl_s": 0.0}}
        )  # fmt: skip
        tier = TierResidency.from_settings(settings)
        assert tier is not None
        for nblocks in (8, 64):
            ids = list(range(10_000, 10_000 + 16 * nblocks))
            blocks = Blocks(tuple(hash_token_blocks(ids, 16, model="bench")), 16, "tokens")
            rns = residency_namespace("bench", 16)
            writer.put_many(rns, [(h, 2_097_152) for h in blocks.hashes], ttl_s=600)
            await tier.leading("bench", blocks)
            walls: list[float] = []
            cpu0 = time.process_time()
            for _ in range(samples):
                t0 = time.perf_counter()
                await tier.leading("bench", blocks)
                walls.append(time.perf_counter() - t0)
            kind = "cached" if cache_ttl else "uncached"
            out[f"{kind}_{nblocks}_cpu_us"] = round((time.process_time() - cpu0) / samples * 1e6, 1)
            out[f"{kind}_{nblocks}_wall_p50_us"] = round(statistics.median(walls) * 1e6, 1)
        await tier.aclose()
    writer.close()
    return out


def _lmcache_installable() -> str:
    return (
        "no: lmcache 0.5.6 requires cupy-cuda13x, cufile-python and nvtx and ships a compiled "
        "cuda_ops extension (pip download lmcache --no-deps, 2026-12-07); its Redis layout is "
        "reproduced here instead"
    )


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = subprocess.run(  # noqa: S603
        ["redis-server", "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.split()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "redis": next((v.split("=")[1] for v in version if v.startswith("v=")), "unknown"),
    }


def run_throughput(quick: bool) -> dict[str, Any]:
    """Measure everything in the module docstring; returns a JSON-ready dict.

    ``quick``: 7 rounds of 0.3 s per metric (about 2 minutes); else 15 rounds of 0.5 s.
    """
    if shutil.which("redis-benchmark") is None:
        raise RuntimeError("redis-benchmark is not installed (Debian package redis-tools)")
    rounds, seconds = (7, 0.3) if quick else (15, 0.5)
    serial = iter(range(1, 1 << 62))
    log_dir = Path(tempfile.mkdtemp(prefix="kvtier-throughput-"))
    proc, url = start_redis(log_dir=log_dir)
    port = urlsplit(url).port or 6379
    store = RedisBlockStore.from_url(url, max_connections=1, timeout_s=30.0)
    admin = RespClient.from_url(url, max_connections=1, timeout_s=30.0)
    blocks: dict[str, Any] = {}
    try:
        for block in BLOCKS:
            ns = TierNamespace(model=block.name, block_size=block.block_tokens, layout="bench")
            samples: dict[str, list[float]] = {}
            for _ in range(rounds):
                ours = _paired_round(store, admin, port, ns, block, seconds, serial)
                for name, value in ours.items():
                    samples.setdefault(name, []).append(value)
            prefix: dict[str, list[float]] = {}
            for _ in range(rounds):
                runs = {
                    "switchyard": _ours_prefix(store, admin, ns, block, seconds, serial),
                    "lmcache_layout_resp": _lmcache_prefix_resp(admin, block, seconds, serial),
                    "lmcache_layout_redispy": asyncio.run(
                        _lmcache_prefix_redispy(url, block, seconds, serial)
                    ),
                }
                for name, rates in runs.items():
                    for op, rate in rates.items():
                        prefix.setdefault(f"{name}_{op}", []).append(rate)
            blocks[block.name] = {
                "value_bytes": block.block_bytes,
                "block_tokens": block.block_tokens,
                "gib_s": {k: _median(v) for k, v in samples.items() if not k.endswith("_us")},
                "client_cpu_us_per_value": {
                    k.removesuffix("_cpu_us"): round(statistics.median(v), 1)
                    for k, v in samples.items()
                    if k.endswith("_cpu_us")
                },
                "prefix_tokens": PREFIX_TOKENS,
                "prefix_gib_s": {k: _median(v) for k, v in prefix.items()},
            }
    finally:
        store.close()
        admin.close()
        proc.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    try:
        proc, url = start_redis(log_dir=log_dir)
        lookup = asyncio.run(_residency_lookup_cost(url, 200 if quick else 1000))
    finally:
        proc.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    best = min(max(b["gib_s"]["ratio_get1"], b["gib_s"]["ratio_read1"]) for b in blocks.values())
    return {
        "machine": _machine(),
        "rounds": rounds,
        "seconds_per_metric": seconds,
        "blocks": blocks,
        "lmcache_installs_on_cpu": _lmcache_installable(),
        "target_get_ratio": 0.8,
        "min_get_ratio": round(best, 3),
        "gateway_residency_lookup": lookup,
    }
