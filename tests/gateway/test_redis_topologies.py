"""``redis_url`` beyond one server: a Sentinel-managed master and a Redis Cluster, for real.

URL parsing and its errors have table tests. Then each shared subsystem runs through
``RedisLink.from_url`` on one redis-server, on one master + one sentinel (quorum 1, the master
requires a password) and on a three-master cluster, all real processes
(:mod:`tests.redis_topologies`): two rate limiters admit exactly the limit and settle, a key
created on one key store is accepted by another after a refresh, two replicas' routing state
syncs; on the cluster every key Switchyard wrote hashes to one slot. Last, the link's breaker
on each: the master (or the node holding the gateway's slot) is killed, calls give None
without an exception and the limiter decides locally, and the link closes again after the
server is back; and a Sentinel failover to a replica is followed by the same link.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import pydantic
import pytest
from pydantic import SecretStr
from redis.asyncio.cluster import RedisCluster as ClusterClient

from autoscale.arrivals import ArrivalCounter
from gateway.errors import Unauthorized
from gateway.keys import KeySpec, KeyStore
from gateway.ratelimit import RateLimiter
from gateway.ratelimit_rules import LimitRule, Verdict
from gateway.redislink import RedisLink, cluster_prefix, redact_url
from gateway.redisurl import RedisTarget, parse_redis_url
from gateway.settings import LimitSettings, RedisSettings, Settings
from tests.gateway.sharedhelpers import build_replicas, shared_state, sync_by_hand
from tests.redis_server import RedisServer
from tests.redis_topologies import RedisCluster, RedisSentinel

PASSWORD = "s3cret-pw"  # the sentinel-managed master's requirepass
RECOVER_S = 30.0  # bound of waiting for a restarted server to serve the link again
POLL_S = 0.05


# -- URL parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1:6379/0", RedisTarget("single")),
        ("rediss://:pw@cache.example:6380/2", RedisTarget("single", tls=True)),
        ("unix:///run/redis.sock?db=1", RedisTarget("single")),
        ("redis+sentinel://10.0.0.1:26379/mymaster",
         RedisTarget("sentinel", hosts=(("10.0.0.1", 26379),), service="mymaster")),
        ("redis+sentinel://:p%40ss@s1,s2:26380,[::1]:26381/svc/3",
         RedisTarget("sentinel", hosts=(("s1", 26379), ("s2", 26380), ("::1", 26381)),
                     service="svc", db=3, password="p@ss")),
        ("rediss+sentinel://app:pw@s1:5000/svc/",
         RedisTarget("sentinel", tls=True, hosts=(("s1", 5000),), service="svc",
                     username="app", password="pw")),
        ("redis+cluster://n1:7000,n2:7001,n3",
         RedisTarget("cluster", hosts=(("n1", 7000), ("n2", 7001), ("n3", 6379)))),
        ("rediss+cluster://:pw@n1:7000/0",
         RedisTarget("cluster", tls=True, hosts=(("n1", 7000),), password="pw")),
        ("REDIS+CLUSTER://u@n1:7000/",
         RedisTarget("cluster", hosts=(("n1", 7000),), username="u")),
    ],
)  # fmt: skip
def test_redis_urls_are_parsed(url: str, target: RedisTarget) -> None:
    assert parse_redis_url(url) == target
    assert target.password is None or target.password not in repr(target)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:6379", "must look like redis://host:port/db"),
        ("http://127.0.0.1:6379", "scheme 'http' is not supported"),
        ("redis+foo://h:1", "scheme 'redis+foo' is not supported"),
        ("sentinel://h:1/svc", "scheme 'sentinel' is not supported"),
        ("redis://127.0.0.1:port/0", "bad port"),
        ("redis+sentinel://h1:26379", "needs the master's service name"),
        ("redis+sentinel://h1:26379/", "needs the master's service name"),
        ("redis+sentinel:///svc", "names no host"),
        ("redis+sentinel://:pw@/svc", "names no host"),
        ("redis+cluster://", "names no host"),
        ("redis+cluster://,,", "names no host"),
        ("redis+cluster://h:0", "bad port"),
        ("redis+cluster://h:70000", "bad port"),
        ("redis+cluster://:1", "host without a name"),
        ("redis+cluster://[::1", "bad host"),
        ("redis+cluster://h:1/1", "only db 0"),
        ("redis+sentinel://h:1/svc/x", "db must be a number"),
        ("redis+sentinel://h:1/svc/0/extra", "too many path segments"),
        ("redis+cluster://h:1?ssl_cert_reqs=none", "no query string"),
    ],
)
def test_bad_redis_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_redis_url(url)


def test_settings_refuse_a_bad_redis_url_without_echoing_its_password() -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        Settings(redis_url="redis+sentinel://:hunter2@h1:26379")
    assert "needs the master's service name" in str(err.value)
    assert "hunter2" not in str(err.value)
    with pytest.raises(pydantic.ValidationError, match="key_prefix must not be empty"):
        Settings(redis_url="redis+cluster://h:7000", redis=RedisSettings(key_prefix=""))
    assert Settings(redis_url="redis+cluster://h:7000").redis_url == "redis+cluster://h:7000"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:pw@h:1/0", "rediss://user:***@h:1/0"),
        ("redis+sentinel://:p@w@s1:1,s2:2/svc/1", "redis+sentinel://:***@s1:1,s2:2/svc/1"),
        ("redis+cluster://u:pw@n1:1,n2:2", "redis+cluster://u:***@n1:1,n2:2"),
        ("redis+cluster://user@n1:1", "redis+cluster://user@n1:1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("prefix", "tagged"),
    [("switchyard:", "{switchyard}:"), ("sy", "{sy}"), ("a:b::", "{a:b}::"), ("{x}:", "{{x}}:")],
)
def test_cluster_prefix_is_one_hash_tag(prefix: str, tagged: str) -> None:
    assert cluster_prefix(prefix) == tagged
    with pytest.raises(ValueError, match="must not be empty"):
        cluster_prefix(":")


def test_only_cluster_links_tag_their_keys() -> None:
    settings = RedisSettings()
    single = RedisLink.from_url("redis://127.0.0.1:1/0", settings)
    sentinel = RedisLink.from_url(f"redis+sentinel://:{PASSWORD}@127.0.0.1:1/svc", settings)
    cluster = RedisLink.from_url(f"redis+cluster://:{PASSWORD}@127.0.0.1:1", settings)
    assert single.key("keys", "version") == sentinel.key("keys", "version")
    assert single.key("keys", "version") == "switchyard:keys:version"  # unchanged names
    assert cluster.key("keys", "version") == "{switchyard}:keys:version"
    assert cluster.key("{rl}", "") == "{switchyard}:{rl}:"  # the FIRST braces decide the slot
    assert PASSWORD not in sentinel.url and PASSWORD not in cluster.url


# -- the deployments -----------------------------------------------------------------------
class Deployment:
    """One running deployment of a kind, its URL, and an outage of the server that holds
    the gateway's keys (``down(key)`` / ``up()``)."""

    def __init__(self, kind: str, stack: ExitStack) -> None:
        self.kind = kind
        self.cluster: RedisCluster | None = None
        self._restart: Callable[[], object] | None = None
        if kind == "single":
            self.server = stack.enter_context(RedisServer())
            self.url = self.server.url
        elif kind == "sentinel":
            self.sentinel = stack.enter_context(RedisSentinel(password=PASSWORD))
            self.url = self.sentinel.url
        else:
            self.cluster = stack.enter_context(RedisCluster())
            self.url = self.cluster.url

    def down(self, key: str) -> None:
        """Kill the server that holds ``key``: the server, the master, or its shard."""
        if self.cluster is not None:
            cluster = self.cluster
            node = cluster.node_for_slot(cluster.keyslot(key))
            cluster.stop_node(node)
            self._restart = lambda: cluster.start_node(node)
        elif self.kind == "sentinel":
            self.sentinel.stop_master()
            self._restart = self.sentinel.start_master
        else:
            self.server.stop()
            self._restart = self.server.start

    def up(self) -> None:
        """Start it again on the same port (a cluster node with its slots)."""
        assert self._restart is not None
        self._restart()
        if self.cluster is not None:
            self.cluster.wait_ok()


KINDS = ("single", "sentinel", "cluster")


@pytest.fixture(scope="module", params=KINDS)
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """Shared by the tests of one kind that leave it running (each uses its own prefix)."""
    with ExitStack() as stack:
        yield Deployment(request.param, stack)


@pytest.fixture(params=KINDS)
def fresh_deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A deployment of its own, for a test that kills a server."""
    with ExitStack() as stack:
        yield Deployment(request.param, stack)


def _link(deployment: Deployment, prefix: str, **redis: Any) -> RedisLink:
    settings = RedisSettings(timeout_s=0.5, key_prefix=prefix, **redis)
    return RedisLink.from_url(deployment.url, settings)


async def _check_one_slot(deployment: Deployment, link: RedisLink) -> None:
    """On a cluster: the keys under the link's prefix are all on one node, the one serving
    the prefix's slot, and every one of them hashes to that slot. Elsewhere: the keys are
    there (each test writes some)."""
    pattern = link.prefix.replace("{", "[{]") + "*"  # KEYS globs: a literal "{"
    cluster = deployment.cluster
    if cluster is None:
        assert await link.client.keys(pattern), "the test wrote no key under its prefix"
        return
    client = cast(ClusterClient, link.client)
    per_node = {node.port: await client.keys(pattern, target_nodes=node)
                for node in client.get_primaries()}  # fmt: skip
    holders = [port for port, keys in per_node.items() if keys]
    slot = cluster.keyslot(link.prefix)
    assert holders == [cluster.ports[cluster.node_for_slot(slot)]]
    assert {cluster.keyslot(key.decode()) for key in per_node[holders[0]]} == {slot}


# -- the three subsystems on each deployment ----------------------------------------------------
@pytest.mark.anyio
async def test_two_limiters_admit_exactly_the_limit_and_settle(deployment: Deployment) -> None:
    links = [_link(deployment, "limits:") for _ in range(2)]
    limiters = [RateLimiter(LimitSettings(), link) for link in links]
    requests = LimitRule("key", "k_topo", "requests", 10)
    tokens = LimitRule("key", "k_topo", "tokens", 1000)
    try:
        verdicts: list[Verdict] = await asyncio.gather(
            *(limiters[i % 2].acquire((requests, tokens), tokens=20) for i in range(30))
        )
        admitted = [v for v in verdicts if v.allowed]
        assert len(admitted) == 10
        assert all(v.headers["x-ratelimit-remaining-requests"] == "0"
                   for v in verdicts if not v.allowed)  # fmt: skip
        for i, verdict in enumerate(admitted):  # each used 5 of the 20 tokens it reserved
            assert verdict.reservation is not None and not verdict.reservation.local
            limiters[i % 2].settle(verdict.reservation, tokens=5)
        for limiter in limiters:
            await limiter.flush_settlements()
        after = await limiters[0].acquire((tokens,), tokens=1)
        assert after.allowed and after.headers["x-ratelimit-remaining-tokens"] == str(1000 - 51)
        # NOSCRIPT after a flush of every server's script cache: loaded again (EVAL).
        await links[0].client.script_flush()
        again = await limiters[1].acquire((tokens,), tokens=1)
        assert again.headers["x-ratelimit-remaining-tokens"] == str(1000 - 52)
        assert [lim.local_decisions for lim in limiters] == [0, 0]
        assert [link.errors for link in links] == [{}, {}]
        await _check_one_slot(deployment, links[0])
    finally:
        for limiter, link in zip(limiters, links, strict=True):
            await limiter.aclose()
            await link.aclose()


@pytest.mark.anyio
async def test_a_key_created_on_one_store_is_accepted_by_another(deployment: Deployment) -> None:
    links = [_link(deployment, "keys:") for _ in range(2)]
    settings = Settings(admin_key=SecretStr("admin-0123456789abcdef"), redis_url=deployment.url)
    a, b = (KeyStore(settings, link=link) for link in links)
    try:
        # The first call of a fresh client is a WATCH/MULTI transaction (no prior load).
        issued = await a.create(KeySpec(name="topo", rpm=7))
        assert a.authenticate(f"Bearer {issued.key}").rpm == 7
        with pytest.raises(Unauthorized):
            b.authenticate(f"Bearer {issued.key}")  # not before its refresh
        assert await b.refresh()
        assert b.authenticate(f"Bearer {issued.key}").rpm == 7
        await b.revoke(issued.record.id)  # a transaction from the other replica
        assert await a.refresh()
        with pytest.raises(Unauthorized):
            a.authenticate(f"Bearer {issued.key}")
        assert [link.errors for link in links] == [{}, {}]
        await _check_one_slot(deployment, links[0])
    finally:
        for link in links:
            await link.aclose()


@pytest.mark.anyio
async def test_two_replicas_share_routing_state(deployment: Deployment) -> None:
    async with build_replicas(deployment.url, key_prefix="rs:") as (a, b):
        a.router.arrivals, b.router.arrivals = ArrivalCounter(), ArrivalCounter()  # autoscaling
        b.router.arrivals.arrived("m", prompt_tokens=10, max_tokens=1)
        await sync_by_hand(a, b, a)
        assert shared_state(a).replicas() == 2 == shared_state(b).replicas()
        assert shared_state(a).read_arrivals("m").totals[shared_state(b).replica_id].requests == 1
        engine_a, engine_b = a.endpoints.get("e0"), b.endpoints.get("e0")
        assert engine_a is not None and engine_b is not None
        lease = engine_a.lease(prompt_tokens=300, max_tokens=20)  # in flight on A ...
        await sync_by_hand(a, b)
        assert engine_b.snapshot().in_flight == 1  # ... counts in B's snapshot
        lease.release()
        assert a.redis is not None and a.redis.errors == {}
        await _check_one_slot(deployment, a.redis)
        await shared_state(b).leave()
        assert await shared_state(a).sync_once()
        assert shared_state(a).replicas() == 1


# -- the breaker on each deployment ------------------------------------------------------------
async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``await check()`` until true, at most ``RECOVER_S`` (bounded, never timed)."""
    for _ in range(round(RECOVER_S / POLL_S)):
        if await check():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"not within {RECOVER_S} s: {what}")


@pytest.mark.anyio
async def test_the_breaker_opens_and_closes_on_each_deployment(
    fresh_deployment: Deployment,
) -> None:
    link = _link(fresh_deployment, "switchyard:", retry_s=0.05)
    limiter = RateLimiter(LimitSettings(), link, replicas=lambda: 2)
    rule = LimitRule("key", "k_down", "requests", 10)
    key = link.key("probe")
    try:
        assert await link.call("set", lambda r: r.set(key, b"1"))
        assert (await limiter.acquire((rule,), tokens=1)).allowed and limiter.local_decisions == 0

        fresh_deployment.down(key)
        assert await link.call("get", lambda r: r.get(key)) is None  # no exception
        assert not link.up and link.errors.get("get") == 1
        assert not await link.probe()
        verdict = await limiter.acquire((rule,), tokens=1)  # decided here: limit / replicas
        assert verdict.allowed and limiter.local_decisions == 1
        assert link.describe()["status"] == "degraded"

        fresh_deployment.up()
        await _until(link.probe, "the link closes again")
        assert link.up
        got = await link.call("set", lambda r: r.set(key, b"2"))
        assert got, link.last_error
        assert (await limiter.acquire((rule,), tokens=1)).allowed
        assert limiter.local_decisions == 1  # shared again
    finally:
        await limiter.aclose()
        await link.aclose()


def test_serve_exits_2_naming_a_bad_redis_url(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("redis_url: redis+sentinel://:hunter2@10.0.0.1:26379\n")
    switchyard = str(Path(sys.executable).with_name("switchyard"))
    result = subprocess.run(  # noqa: S603
        [switchyard, "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs the master's service name" in result.stderr
    assert "hunter2" not in result.stderr


@pytest.mark.anyio
async def test_a_sentinel_failover_is_followed_without_a_restart() -> None:
    with RedisSentinel(password=PASSWORD, replica=True) as sentinel:
        link = RedisLink.from_url(sentinel.url, RedisSettings(timeout_s=0.5, retry_s=0.05))
        limiter = RateLimiter(LimitSettings(), link)
        rule = LimitRule("key", "k_failover", "requests", 3)
        key = link.key("before")
        try:
            assert (await limiter.acquire((rule,), tokens=1)).allowed
            assert await link.call("set", lambda r: r.set(key, b"written"))
            assert await link.call("wait", lambda r: r.wait(1, 5000)) == 1  # on the replica

            sentinel.stop_master()
            assert await link.call("get", lambda r: r.get(key)) is None and not link.up

            async def promoted() -> bool:
                return str(sentinel.replica_port).encode() in sentinel.master_addr()

            await _until(promoted, "the sentinel promotes the replica")
            await _until(link.probe, "the link finds the new master")
            assert await link.call("get", lambda r: r.get(key)) == b"written"
            # The limiter's script is loaded again there (NOSCRIPT -> EVAL); its window moved
            # with the data: 1 of 3 was used before the failover.
            verdicts = [await limiter.acquire((rule,), tokens=1) for _ in range(3)]
            assert [v.allowed for v in verdicts] == [True, True, False]
            assert limiter.local_decisions == 0
        finally:
            await limiter.aclose()
            await link.aclose()
