"""Shared routing state between replicas, against a real redis-server.

Two :class:`Services` (two replicas) share one Redis and sync by hand (``sync_once``) where a
test checks what one sync carries, and through their own background loops (two real
gateways in threads) where it checks the whole path. Pure helpers have table tests.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import httpx
import msgpack
import orjson
import pytest
import redis.asyncio as aioredis

from gateway import sharedstate, sharedwire
from gateway.endpoints import EndpointState
from gateway.parsing import Kind, parse_request
from gateway.services import Services
from gateway.sharedstate import SharedRoutingState
from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.servers import wait_until
from tests.gateway.sharedhelpers import MODEL, build_replicas, shared_state, sync_by_hand
from tests.redis_server import RedisServer

POLL_S = 10.0  # bound of every wait for a background sync (polled, never timed)


# -- pure helpers ---------------------------------------------------------------------------
def _packed(unpacked: list[tuple[str, list[int]]]) -> list[tuple[str, bytes]]:
    return [(eid, array("Q", hashes).tobytes()) for eid, hashes in unpacked]


@pytest.mark.parametrize(
    ("records", "max_hashes", "max_bytes", "unpacked", "taken"),
    [
        ([], 8, 1024, [], 0),
        ([("e0", (1, 2, 3))], 8, 1024, [("e0", [1, 2, 3])], 1),
        ([("e0", (2**64 - 1, 0))], 8, 1024, [("e0", [2**64 - 1, 0])], 1),  # unsigned 64-bit
        ([("e0", (1, 2, 3, 4))], 2, 1024, [("e0", [1, 2])], 1),  # the chain's head is kept
        ([("e0", (1, 2)), ("e0", (1, 2)), ("e1", (1, 2))], 8, 1024,
         [("e0", [1, 2]), ("e1", [1, 2])], 3),  # duplicates dropped, but consumed
        ([("e0", (1, 2)), ("e1", (3, 4)), ("e0", (5,))], 8, 24,
         [("e0", [1, 2])], 1),  # byte cap: the rest waits for the next sync
        ([("e0", tuple(range(10)))], 16, 8, [("e0", list(range(10)))], 1),  # one always goes
        ([("e0", ()), ("e1", (7,))], 8, 1024, [("e1", [7])], 2),  # empty chains consumed
    ],
)  # fmt: skip
def test_prefix_records_are_packed_deduplicated_and_capped(
    records: list[tuple[str, tuple[int, ...]]],
    max_hashes: int,
    max_bytes: int,
    unpacked: list[tuple[str, list[int]]],
    taken: int,
) -> None:
    packed, n = sharedwire.pack_prefixes(records, max_hashes=max_hashes, max_bytes=max_bytes)
    assert n == taken
    assert packed == _packed(unpacked)
    assert sharedwire.unpack_batch(sharedwire.pack_batch(packed, {})).prefixes == tuple(unpacked)


@pytest.mark.parametrize(
    ("prefixes", "charges", "batch"),
    [
        ([], {}, sharedwire.Batch()),
        ([("e0", [1, 2])], {"alice": 120.0, "bob": 3.5},
         sharedwire.Batch((("e0", [1, 2]),), {"alice": 120.0, "bob": 3.5})),
        ([], {"alice": 1.0}, sharedwire.Batch(charges={"alice": 1.0})),
        ([("e1", [7])], {}, sharedwire.Batch((("e1", [7]),))),
    ],
)  # fmt: skip
def test_batch_round_trip(
    prefixes: list[tuple[str, list[int]]], charges: dict[str, float], batch: sharedwire.Batch
) -> None:
    blob = sharedwire.pack_batch(_packed(prefixes), charges)
    assert (blob == b"") == (batch == sharedwire.Batch())
    assert sharedwire.unpack_batch(blob) == batch


@pytest.mark.parametrize(
    "doc",
    [
        [1, 2],  # not a map
        {"p": {"e0": b"x"}},
        {"p": [["e0"]]},
        {"p": [[1, b"12345678"]]},
        {"p": [["e0", b"123"]]},  # not whole hashes
        {"v": [1]},
        {"v": {"a": -1.0}},
        {"v": {1: 2.0}},
        {"v": {"a": "1"}},
    ],
)
def test_bad_batches_are_refused(doc: Any) -> None:
    with pytest.raises(ValueError):
        sharedwire.unpack_batch(msgpack.packb(doc))
    with pytest.raises(ValueError):
        sharedwire.unpack_batch(b"\xc1")  # never valid msgpack


@pytest.mark.parametrize(
    ("loads", "unpacked"),
    [
        ({}, {}),
        ({"e0": (0, 0, 0)}, {}),  # idle engines are left out
        ({"e0": (2, 300, 100), "e1": (0, 0, 0)}, {"e0": (2, 300, 100)}),
    ],
)
def test_loads_round_trip(
    loads: dict[str, tuple[int, int, int]], unpacked: dict[str, tuple[int, int, int]]
) -> None:
    assert sharedwire.unpack_loads(sharedwire.pack_loads(loads)) == unpacked


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"e0": [1, 2]}),
        msgpack.packb({"e0": [1, 2, "x"]}),
    ],
)
def test_bad_loads_are_refused(blob: bytes) -> None:
    with pytest.raises(ValueError):
        sharedwire.unpack_loads(blob)


@pytest.mark.parametrize(
    ("replicas", "total"),
    [
        ([], {}),
        ([{"e0": (1, 10, 5)}], {"e0": (1, 10, 5)}),
        ([{"e0": (1, 10, 5)}, {"e0": (2, 20, 0), "e1": (1, 1, 1)}],
         {"e0": (3, 30, 5), "e1": (1, 1, 1)}),
    ],
)  # fmt: skip
def test_sum_loads(
    replicas: list[dict[str, tuple[int, int, int]]], total: dict[str, tuple[int, int, int]]
) -> None:
    assert sharedwire.sum_loads(replicas) == total


@pytest.mark.parametrize(
    ("raw", "replicas", "last", "loads", "entries"),
    [
        ([5, 2, b"1-0", [b"me", b"x", b"you", b"y"], [b"p"]], 2, "1-0", {"you": b"y"}, [b"p"]),
        ([5, 0, "0-0", [], []], 1, "0-0", {}, []),  # at least this replica
        ((5, 1, "2-1", ["me", "x"], ["p", "q"]), 1, "2-1", {},
         [b"p", b"q"]),  # str replies (decode_responses) work too
    ],
)  # fmt: skip
def test_parse_reply(
    raw: Any, replicas: int, last: str, loads: dict[str, bytes], entries: list[Any]
) -> None:
    reply = sharedwire.parse_reply(raw, replica_id="me")
    assert (reply.replicas, reply.last_id, reply.loads, reply.entries) == (
        replicas, last, loads, entries,
    )  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [None, [1, 2, 3], [1, 1, "0-0", "x", []], [1, 1, "0-0", ["odd"], []], [1, 1, "0", [], 7]],
)
def test_malformed_replies_are_refused(raw: Any) -> None:
    with pytest.raises(ValueError):
        sharedwire.parse_reply(raw, replica_id="me")


# -- two replicas on one Redis, synced by hand ----------------------------------------------
def _engine(services: Services, eid: str = "e0") -> EndpointState:
    state = services.endpoints.get(eid)
    assert state is not None
    return state


@pytest.mark.anyio
async def test_in_flight_on_one_replica_counts_in_the_others_snapshots(
    redis_server: RedisServer,
) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        lease = _engine(a).lease(prompt_tokens=300, max_tokens=20)
        await sync_by_hand(a, b)
        snap = _engine(b).snapshot()
        assert (snap.in_flight, snap.in_flight_tokens, snap.prefill_tokens) == (1, 320, 300)
        assert _engine(b).engine.local_load() == (0, 0, 0)  # B never publishes A's load
        assert _engine(b, "e1").snapshot().in_flight == 0
        lease.first_token(ttft_s=0.01)
        await sync_by_hand(a, b)
        assert _engine(b).snapshot().prefill_tokens == 0
        lease.release()
        await sync_by_hand(a, b)
        assert _engine(b).snapshot().in_flight == 0
        assert _engine(a).snapshot().in_flight == 0  # B had nothing to add to A


@pytest.mark.anyio
async def test_prefix_committed_on_one_replica_is_matched_by_the_other(
    redis_server: RedisServer,
) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        await sync_by_hand(a, b)  # both past the (empty) stream's start
        body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]})
        fields = parse_request(body, Kind.CHAT)
        policy = a.router.policy(None)
        routed = await a.router.route(Kind.CHAT, fields, model=MODEL, adapter=None, policy=policy)
        chosen = routed.decision.ranked[0].id
        routed.committed(chosen, 200)
        hashes = routed.blocks.hashes
        assert len(hashes) > 10 and b.router.index.match(hashes) == {}
        await sync_by_hand(a, b)
        assert b.router.index.match(hashes) == {chosen: len(hashes)}
        assert not a.router.outbox  # published once
        await sync_by_hand(a, b)
        assert a.router.index.match(hashes) == {chosen: len(hashes)}  # no echo of its own
        # B now routes the same prompt to the engine A chose
        again = await b.router.route(Kind.CHAT, fields, model=MODEL, adapter=None, policy=policy)
        assert again.decision.ranked[0].id == chosen
        assert _sent_received(a) == (1, 0) and _sent_received(b) == (0, 1)


@pytest.mark.anyio
async def test_replicas_start_their_request_sequences_apart(redis_server: RedisServer) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        first_a, first_b = a.endpoints.next_seq(), b.endpoints.next_seq()
        assert first_a != first_b  # seq-derived tie-breaks differ (equal: 1 in 2**32)
        assert a.endpoints.next_seq() == first_a + 1
        a.endpoints.advance_seq(-5)  # never backwards
        assert a.endpoints.next_seq() == first_a + 2


@pytest.mark.anyio
async def test_a_new_replica_reads_the_recent_records(redis_server: RedisServer) -> None:
    async with build_replicas(redis_server.url, n=3) as (a, b, late):
        a.router.outbox.append(("e1", (11, 12, 13)))  # type: ignore[union-attr]
        await sync_by_hand(a)
        await sync_by_hand(late)  # first sync: the newest entries, not only what comes next
        assert late.router.index.match((11, 12, 13)) == {"e1": 3}
        b.router.outbox.append(("nope", (21, 22)))  # type: ignore[union-attr]
        await sync_by_hand(b, a)  # an engine A does not know: ignored
        assert a.router.index.match((21, 22)) == {}


@pytest.mark.anyio
async def test_vtc_service_merges_across_replicas(redis_server: RedisServer) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        await sync_by_hand(a, b)
        a.router.vtc.charge("alice", input_tokens=100, output_tokens=10)
        b.router.vtc.charge("alice", input_tokens=50)
        b.router.vtc.charge("bob", input_tokens=7)
        await sync_by_hand(a, b, a)
        for services in (a, b):
            assert services.router.vtc.counter("alice") == 170.0
            assert services.router.vtc.counter("bob") == 7.0
        await sync_by_hand(a, b)  # nothing is counted twice
        assert a.router.vtc.counter("alice") == b.router.vtc.counter("alice") == 170.0


@pytest.mark.anyio
async def test_replicas_count_live_ones_and_a_stopped_one_leaves(
    redis_server: RedisServer,
) -> None:
    async with build_replicas(redis_server.url, n=3) as (a, b, c):
        assert shared_state(a).replicas() == 1  # limits.replicas before any sync
        await sync_by_hand(a, b, c, a)
        assert shared_state(a).replicas() == 3 == shared_state(c).replicas()
        await shared_state(c).leave()  # a clean stop deregisters at once
        await sync_by_hand(a)
        assert shared_state(a).replicas() == 2
        lease = _engine(b).lease(prompt_tokens=10)
        await sync_by_hand(b, a)
        assert _engine(a).snapshot().in_flight == 1
        # b dies without leaving: dropped after the liveness, and its load with it
        with anyio.fail_after(POLL_S):
            while shared_state(a).replicas() != 1:
                await sync_by_hand(a)
                await anyio.sleep(0.05)
        assert _engine(a).snapshot().in_flight == 0
        lease.release()


@pytest.mark.anyio
async def test_redis_down_serves_on_local_state_then_resumes(redis_server: RedisServer) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        lease = _engine(b).lease(prompt_tokens=10)
        await sync_by_hand(a, b, a)
        assert _engine(a).snapshot().in_flight == 1 and shared_state(a).replicas() == 2
        redis_server.stop()
        shared = shared_state(a)
        assert not await shared.sync_once()  # no exception: the link opens its breaker
        assert not a.redis.up  # type: ignore[union-attr]
        assert _engine(a).snapshot().in_flight == 1  # kept for up to the liveness...
        with anyio.fail_after(POLL_S):
            while _engine(a).snapshot().in_flight:  # ...then cleared: nothing sticks
                assert not await shared.sync_once()
                await anyio.sleep(0.05)
        assert shared.replicas() == 2  # the last known count
        a.router.outbox.append(("e1", (31, 32)))  # type: ignore[union-attr]
        a.router.vtc.charge("carol", input_tokens=5)  # made while down: published later
        redis_server.start()
        for _ in range(100):  # the link's probe (its run loop is not running here)
            if await a.redis.probe():  # type: ignore[union-attr]
                break
            await anyio.sleep(0.05)
        await sync_by_hand(a, b, a)  # a fresh server: the script is loaded again
        assert _engine(a).snapshot().in_flight == 1
        assert b.router.index.match((31, 32)) == {"e1": 2}
        assert b.router.vtc.counter("carol") == 5.0
        assert _metric(a, "switchyard_shared_state_sync_errors_total") >= 2
        lease.release()


@pytest.mark.anyio
async def test_stale_counts_are_cleared_after_the_liveness_by_the_clock(
    redis_server: RedisServer,
) -> None:
    now = [100.0]
    async with build_replicas(redis_server.url) as (a, b):
        shared = SharedRoutingState(
            a.redis,  # type: ignore[arg-type]
            endpoints=a.endpoints,
            router=a.router,
            settings=a.settings,
            registry=a.metrics.registry.__class__(),
            clock=lambda: now[0],
            replica_id="clocked",
        )
        assert shared.liveness_s == 1.0  # max(1 s, 5 x 0.05 s)
        lease = _engine(b).lease(prompt_tokens=10)
        await sync_by_hand(b)
        assert await shared.sync_once()
        assert _engine(a).snapshot().in_flight == 1
        redis_server.stop()
        for at, in_flight in ((100.5, 1), (100.99, 1), (101.0, 0), (105.0, 0)):
            now[0] = at
            assert not await shared.sync_once()
            assert _engine(a).snapshot().in_flight == in_flight, at
        assert shared.describe()["last_sync_age_s"] == 5.0
        lease.release()


@pytest.mark.anyio
async def test_shared_keys_are_bounded(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sharedstate, "STREAM_MAXLEN", 10)
    async with build_replicas(redis_server.url) as (a, b):
        lease = _engine(a).lease(prompt_tokens=1)  # a load to publish
        for i in range(400):
            a.router.outbox.append(("e0", (i + 1, i + 2)))  # type: ignore[union-attr]
            await sync_by_hand(a)
        await sync_by_hand(b)
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            keys = sorted(k.decode() for k in await client.keys("*"))
            assert keys == ["switchyard:rs:events", "switchyard:rs:load", "switchyard:rs:replicas"]
            # MAXLEN ~ trims whole nodes (stream-node-max-entries, 100 by default)
            assert 10 <= await client.xlen("switchyard:rs:events") <= 110
            for key in keys:
                assert 0 < await client.pttl(key) <= sharedstate.STREAM_TTL_S * 1000
            assert await client.hlen("switchyard:rs:load") == 1  # A's; B is idle
            lease.release()
            await sync_by_hand(a)
            assert not await client.exists("switchyard:rs:load")  # nobody busy: no hash
        finally:
            await client.aclose()
        # a replica far behind catches up over several syncs, READ_COUNT entries each
        assert _sent_received(b)[1] <= sharedstate.READ_COUNT


@pytest.mark.anyio
async def test_garbage_in_redis_is_skipped_not_fatal(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        await sync_by_hand(a, b)
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await client.zadd("switchyard:rs:replicas", {"rogue": 1e15})  # far future: live
            await client.hset("switchyard:rs:load", "rogue", b"\xc1")
            await client.xadd("switchyard:rs:events", {"r": "rogue", "b": b"\xc1"})
        finally:
            await client.aclose()
        b.router.outbox.append(("e0", (41, 42)))  # type: ignore[union-attr]
        await sync_by_hand(b, a)  # the rogue entries are skipped, the good ones applied
        assert a.router.index.match((41, 42)) == {"e0": 2}
        assert shared_state(a).replicas() == 3
        shared = shared_state(a)

        async def nonsense(client: Any, args: list[Any]) -> Any:
            return [1, 2]

        monkeypatch.setattr(shared, "_run_script", nonsense)
        assert not await shared.sync_once()
        assert a.redis.up  # type: ignore[union-attr]  # Redis answered: the link stays up


def _metric(services: Services, name: str, labels: dict[str, str] | None = None) -> float:
    value = services.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


def _sent_received(services: Services) -> tuple[float, float]:
    name = "switchyard_shared_state_prefix_records_total"
    return (
        _metric(services, name, {"direction": "sent"}),
        _metric(services, name, {"direction": "received"}),
    )


# -- two real gateways (threads), their own sync loops ------------------------------------------
def _scrape(client: httpx.Client, url: str, name: str) -> dict[str, float]:
    """Samples of ``name`` on ``url``/metrics: label text -> value."""
    out: dict[str, float] = {}
    for line in client.get(f"{url}/metrics").text.splitlines():
        m = re.match(rf"^{name}(\{{.*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def _until(predicate: Callable[[], bool]) -> None:
    assert wait_until(predicate, timeout=POLL_S), "no sync within the bound"


def test_two_gateways_share_load_prefixes_and_replica_count(
    redis_server: RedisServer, start_engines: StartEngines, start_gateway: StartGateway
) -> None:
    engines = start_engines(2)
    urls = [srv.url for _, srv in engines]
    common: dict[str, Any] = {
        "redis_url": redis_server.url,
        "redis": {"sync_interval_s": 0.02, "timeout_s": 0.5},
        "routing": {"policy": "prefix-cache", "scrape_interval_s": 0},
    }
    gw_a = start_gateway(urls, **common)
    gw_b = start_gateway(urls, **common)
    replicas = "switchyard_shared_state_replicas"
    in_flight = "switchyard_proxy_in_flight_requests"
    with httpx.Client(timeout=30) as client:
        for gw in (gw_a, gw_b):
            _until(lambda gw=gw: _scrape(client, gw.url, replicas).get("") == 2.0)  # type: ignore[misc]
        # a slow request through A shows in B's in-flight counts while it runs
        body = {"model": MODEL, "messages": [{"role": "user", "content": "slow"}],
                "stream": True, "fake": {"ttft": 1.5}}  # fmt: skip
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, f"{gw_a.url}/v1/chat/completions", json=body, timeout=30)
            _until(lambda: sum(_scrape(client, gw_b.url, in_flight).values()) == 1.0)
            assert slow.result().status_code == 200
        _until(lambda: sum(_scrape(client, gw_b.url, in_flight).values()) == 0.0)
        # a prefix committed through A: B routes the same prompt to the same engine
        prompt = {"model": MODEL, "messages": [{"role": "user", "content": "shared " * 400}]}
        counts = [engine.requests for engine, _ in engines]
        assert client.post(f"{gw_a.url}/v1/chat/completions", json=prompt).status_code == 200
        served = [engine.requests for engine, _ in engines]
        owner = next(
            i for i, (was, now) in enumerate(zip(counts, served, strict=True)) if now > was
        )
        owner_id = urls[owner].removeprefix("http://")
        received = "switchyard_shared_state_prefix_records_total"
        _until(lambda: _scrape(client, gw_b.url, received).get('{direction="received"}', 0) >= 1)
        second = client.post(f"{gw_b.url}/v1/chat/completions", json=prompt)
        assert second.status_code == 200
        assert f"match={owner_id}:" in second.headers["x-switchyard-route"]
        assert engines[owner][0].requests == served[owner] + 1
        # A stops (deregisters): B counts itself alone
        gw_a.stop()
        _until(lambda: _scrape(client, gw_b.url, replicas).get("") == 1.0)
