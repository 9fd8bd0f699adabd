"""Arrivals shared between gateway replicas through Redis, for the embedded autoscaler.

The wire format as tables; then replicas in-process on a real redis-server, synced by hand
(:mod:`tests.gateway.sharedhelpers`), read by the leader's :class:`GatewaySource` on a fake
clock: it sees every replica's arrivals, replicas that leave or join never make negative or
spiking rates, and while Redis is down the rate is an estimate, flagged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge

from autoscale.arrivals import ArrivalCounter, ArrivalTotals
from autoscale.kube import PodInfo, Scale
from autoscale.sources import TargetState
from gateway import sharedwire
from gateway.autoscaling import GatewaySource
from gateway.services import Services
from gateway.settings import Settings
from tests.gateway.sharedhelpers import MODEL, build_replicas, shared_state, sync_by_hand
from tests.redis_server import RedisServer

T = ArrivalTotals


# -- the wire format ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "by_model",
    [{}, {"m": T(1, 2, 3)}, {"m": T(10**12, 0, 5), "__other__": T(4, 40, 0)}],
)
def test_arrivals_round_trip(by_model: dict[str, T]) -> None:
    blob = sharedwire.pack_arrivals(by_model)
    assert blob  # never empty: an empty blob means "this replica counts none"
    assert sharedwire.unpack_arrivals(blob) == by_model


@pytest.mark.parametrize(
    "blob",
    [b"", b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"m": [1, 2]}),
     msgpack.packb({"m": [1, -2, 3]}), msgpack.packb({"m": [1, True, 3]}),
     msgpack.packb({7: [1, 2, 3]})],
)  # fmt: skip
def test_bad_arrivals_are_refused(blob: bytes) -> None:
    with pytest.raises(ValueError):
        sharedwire.unpack_arrivals(blob)


@pytest.mark.parametrize(
    ("raw", "arrivals"),
    [
        ([5, 2, "1-0", [], [], [b"me", b"x", b"you", b"y"]], {"you": b"y"}),  # own left out
        ([5, 2, "1-0", [], [], []], {}),  # this replica counts none: nothing read
        ([5, 2, "1-0", [], []], {}),  # without the arrivals part
    ],
)
def test_the_reply_carries_the_other_replicas_arrivals(
    raw: list[Any], arrivals: dict[str, bytes]
) -> None:
    assert sharedwire.parse_reply(raw, replica_id="me").arrivals == arrivals


def test_a_malformed_arrivals_part_is_refused() -> None:
    with pytest.raises(ValueError):
        sharedwire.parse_reply([5, 2, "1-0", [], [], ["odd"]], replica_id="me")


# -- replicas on one Redis ----------------------------------------------------------------
class Reader:
    async def read(self) -> TargetState:
        return TargetState(Scale(1, 1, "app=x"), (PodInfo("e0", "10.0.0.1", True),))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


def _counting(*replicas: Services) -> list[ArrivalCounter]:
    """Autoscaling's counters on each replica (as Services.build does when it is enabled)."""
    counters = []
    for services in replicas:
        services.router.arrivals = ArrivalCounter()
        counters.append(services.router.arrivals)
    return counters


def _arrive(counter: ArrivalCounter, n: int, model: str = MODEL) -> None:
    for _ in range(n):
        counter.arrived(model, prompt_tokens=100, max_tokens=10)


class Leader:
    """Replica ``services``' embedded source, observed one (fake) second apart."""

    def __init__(self, services: Services) -> None:
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.gauge = Gauge("estimated", "test", registry=self.registry)
        self.source = GatewaySource(
            reader=Reader(), endpoints=services.endpoints, arrivals=shared_state(services),
            clock=self.clock, model=MODEL, scraped=False, estimated=self.gauge,
        )  # fmt: skip

    async def rates(self) -> tuple[float, float, float]:
        obs = await self.source.observe()
        self.clock.t += 1.0
        return obs.arrival_rate, obs.prompt_token_rate, obs.output_token_rate

    def estimated(self) -> float:
        value = self.registry.get_sample_value("estimated")
        assert value is not None
        return value


@pytest.mark.anyio
async def test_the_leader_sees_both_replicas_arrivals(redis_server: RedisServer) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        count_a, count_b = _counting(a, b)
        leader = Leader(a)
        await sync_by_hand(a, b, a)
        assert await leader.rates() == (0.0, 0.0, 0.0)  # the first reading: baselines
        _arrive(count_a, 2)
        _arrive(count_b, 5)
        _arrive(count_b, 50, model="another-model")  # not the autoscaler's model
        await sync_by_hand(b, a)
        assert await leader.rates() == (7.0, 700.0, 70.0)
        assert leader.estimated() == 0.0
        reading = shared_state(a).read_arrivals(MODEL)
        assert reading.totals == {shared_state(a).replica_id: T(2, 200, 20),
                                  shared_state(b).replica_id: T(5, 500, 50)}  # fmt: skip
        assert (reading.replicas, reading.estimated) == (2, False)
        every_model = shared_state(a).read_arrivals(None).totals
        assert every_model[shared_state(b).replica_id].requests == 55
        await sync_by_hand(b)  # the follower's source sees the same fleet-wide totals
        assert sum(t.requests for t in shared_state(b).read_arrivals(MODEL).totals.values()) == 7


@pytest.mark.anyio
async def test_replicas_leaving_and_joining_never_make_negative_or_spiking_rates(
    redis_server: RedisServer,
) -> None:
    async with build_replicas(redis_server.url, n=3) as (a, b, c):
        count_a, count_b = _counting(a, b)
        leader = Leader(a)
        _arrive(count_b, 40)
        await sync_by_hand(a, b, a)
        await leader.rates()
        await shared_state(b).leave()  # b stops (its totals leave Redis with it)
        _arrive(count_a, 3)
        await sync_by_hand(a)
        assert await leader.rates() == (3.0, 300.0, 30.0)  # not 3 - 40
        (count_c,) = _counting(c)  # c joins with a long history (or after a gap)
        _arrive(count_c, 1000)
        await sync_by_hand(c, a)
        assert await leader.rates() == (0.0, 0.0, 0.0)  # a baseline, not 1000/s
        _arrive(count_c, 4)
        _arrive(count_a, 1)
        await sync_by_hand(c, a)
        assert await leader.rates() == (5.0, 500.0, 50.0)
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            fields = await client.hkeys("switchyard:rs:arrivals")
            assert sorted(f.decode() for f in fields) == sorted(
                shared_state(s).replica_id for s in (a, c)
            )  # b's field went with it
            assert 0 < await client.pttl("switchyard:rs:arrivals") <= 2000
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_redis_down_estimates_from_this_replica_and_flags_it(
    redis_server: RedisServer,
) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        count_a, count_b = _counting(a, b)
        leader = Leader(a)
        await sync_by_hand(a, b, a)
        await leader.rates()
        redis_server.stop()
        assert not await shared_state(a).sync_once()
        _arrive(count_a, 3)
        _arrive(count_b, 100)  # unknown to a while Redis is down
        assert await leader.rates() == (6.0, 600.0, 60.0)  # a's 3 x 2 live replicas last seen
        assert leader.estimated() == 1.0
        assert shared_state(a).read_arrivals(MODEL).estimated
        redis_server.start()
        for _ in range(100):  # the link's probe (its run loop is not running here)
            if await a.redis.probe() and await b.redis.probe():  # type: ignore[union-attr]
                break
            await anyio.sleep(0.05)
        _arrive(count_a, 1)
        await sync_by_hand(b, a)
        assert await leader.rates() == (2.0, 200.0, 20.0)  # b's totals: a baseline again
        assert leader.estimated() == 0.0
        _arrive(count_a, 1)
        _arrive(count_b, 2)
        await sync_by_hand(b, a)
        assert await leader.rates() == (3.0, 300.0, 30.0)


@pytest.mark.anyio
async def test_a_replica_that_does_not_count_arrivals_publishes_none(
    redis_server: RedisServer,
) -> None:
    async with build_replicas(redis_server.url) as (a, b):
        (count_a,) = _counting(a)  # b: autoscaling disabled
        _arrive(count_a, 2)
        await sync_by_hand(a, b, a)
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            fields = await client.hkeys("switchyard:rs:arrivals")
            assert [f.decode() for f in fields] == [shared_state(a).replica_id]
        finally:
            await client.aclose()
        assert set(shared_state(a).read_arrivals(MODEL).totals) == {shared_state(a).replica_id}


@pytest.mark.anyio
async def test_services_give_the_embedded_autoscaler_the_shared_arrivals(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"  # never contacted: the autoscaler is not run
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: dummy}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u, namespace: default}}]\n"
    )
    autoscaling = {"enabled": True, "target": {"name": "llm"}, "kubeconfig": str(kubeconfig)}
    for redis_url in (redis_server.url, None):
        settings = Settings.model_validate(
            {"engines": [{"url": "http://127.0.0.1:9/a"}], "redis_url": redis_url,
             "autoscaling": autoscaling}
        )  # fmt: skip
        services = Services.build(settings)
        try:
            assert services.autoscaler is not None
            source = services.autoscaler.controller.source
            assert isinstance(source, GatewaySource)
            expected = services.shared if redis_url else services.router.arrivals
            assert source.arrivals is expected and expected is not None
            names = {m.name for m in services.metrics.registry.collect()}
            assert "switchyard_autoscaler_arrivals_estimated_ratio" in names
        finally:
            await services.aclose()
