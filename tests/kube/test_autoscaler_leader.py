"""Leader election on a Lease against the emulated API (real client), short durations.

Races resolve to one leader (the API's 409 on a stale resourceVersion, or on a second
create); a release hands over at once; a leader that cannot renew stops leading by its
deadline; and the failover test runs two controllers, kills the leader (cancelled, no
release) and checks from the patches' authors that the other actuates within about one
lease duration and never while the first still did.
"""

from __future__ import annotations

import time

import anyio
import pytest

from autoscale.kube import KubeApi, ScaleClient, ScaleTarget
from autoscale.leader import LeaderElector
from tests.kube.autoscalehelpers import (
    NS,
    PatchLog,
    Wants,
    controller,
    create_deployment,
    eventually,
    kube_api,
)
from tests.kube.simproc import KubeSimProcess

pytestmark = pytest.mark.anyio

LEASE_S, RENEW_S, RETRY_S = 3.0, 2.0, 0.5
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/autoscaler"


def elector(api: KubeApi, identity: str, *, release: bool = True) -> LeaderElector:
    return LeaderElector(
        api,
        name="autoscaler",
        namespace=NS,
        identity=identity,
        lease_duration_s=LEASE_S,
        renew_deadline_s=RENEW_S,
        retry_period_s=RETRY_S,
        release_on_cancel=release,
    )


async def all_try(electors: list[LeaderElector]) -> list[bool]:
    results: dict[str, bool] = {}

    async def one(e: LeaderElector) -> None:
        results[e.identity] = await e.try_once()

    async with anyio.create_task_group() as tg:
        for e in electors:
            tg.start_soon(one, e)
    return [results[e.identity] for e in electors]


async def lease_holder(api: KubeApi) -> str:
    body = await api.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/autoscaler"
    )
    return str(body["spec"].get("holderIdentity") or "")


async def test_racing_electors_get_one_leader(kube_sim: KubeSimProcess) -> None:
    apis = [kube_api(kube_sim) for _ in range(3)]
    try:
        electors = [elector(api, f"e{i}") for i, api in enumerate(apis)]
        first = await all_try(electors)  # three creates at once: one succeeds, two get 409
        assert sum(first) == 1
        leader = electors[first.index(True)]
        for _ in range(4):  # renewals keep it; the others wait
            assert await all_try(electors) == first
        assert await lease_holder(apis[0]) == leader.identity
        assert all(e.holder == leader.identity for e in electors)

        # the leader's next renewal is answered 409 (a race lost): it re-reads, still holds
        kube_sim.faults(conflicts=1)
        assert await leader.try_once()
        assert leader.is_leader()

        # the leader goes quiet: once the lease expires the others race; one wins
        await anyio.sleep(LEASE_S + 0.2)
        assert not leader.is_leader()  # its own deadline passed long before
        rest = [e for e in electors if e is not leader]
        second = await all_try(rest)
        assert sum(second) == 1
        winner = rest[second.index(True)]
        assert await lease_holder(apis[0]) == winner.identity
        assert not await leader.try_once()  # the old leader now waits
        body = await apis[0].request("GET", LEASE_PATH)
        assert body["spec"]["leaseTransitions"] == 1
    finally:
        for api in apis:
            api.close()


async def test_release_hands_the_lease_over_at_once(kube_sim: KubeSimProcess) -> None:
    api_a, api_b = kube_api(kube_sim), kube_api(kube_sim)
    try:
        a, b = elector(api_a, "a"), elector(api_b, "b")
        assert await a.try_once() and not await b.try_once()
        assert await a.release()
        assert not a.is_leader()
        assert await lease_holder(api_a) == ""
        assert await b.try_once()  # no waiting for the lease to expire
        assert not await a.release()  # not the holder: nothing to release
        assert await lease_holder(api_a) == "b"
    finally:
        api_a.close()
        api_b.close()


async def test_a_leader_that_cannot_renew_stops_by_its_deadline(
    kube_sim: KubeSimProcess,
) -> None:
    api = kube_api(kube_sim, timeout_s=0.5)
    try:
        changes: list[bool] = []
        e = LeaderElector(api, name="autoscaler", namespace=NS, identity="a",
                          lease_duration_s=LEASE_S, renew_deadline_s=RENEW_S,
                          retry_period_s=RETRY_S, on_change=changes.append)  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(e.run)
            await eventually("leading", e.is_leader)
            kube_sim.faults(error_rate=1.0)
            lost_from = time.monotonic()
            await eventually("stopped leading", lambda: not e.is_leader(), RENEW_S + 5)
            # by its deadline (is_leader() checks it itself); the slack covers the last good
            # renewal having started up to one retry period before the faults
            assert time.monotonic() - lost_from <= RENEW_S + RETRY_S + 1.0
            kube_sim.faults(error_rate=0.0)
            await eventually("leading again", e.is_leader, LEASE_S + 5)
            tg.cancel_scope.cancel()
        assert changes[:3] == [True, False, True]
        assert await lease_holder(api) == ""  # released on cancel
    finally:
        kube_sim.faults(error_rate=0.0)
        api.close()


async def test_leader_failover_one_actuator_at_a_time(kube_sim: KubeSimProcess) -> None:
    """Two controllers patch a Deployment every tick when leading; the leader is killed (no
    release); the other takes over after about one lease duration, never both at once."""
    apis = {name: kube_api(kube_sim) for name in ("a", "b")}
    try:
        await create_deployment(apis["a"], "web", 1)
        log = PatchLog()
        electors = {n: elector(api, n, release=False) for n, api in apis.items()}
        ctls = {
            n: controller(api, "web", Wants(1, alternate=(1, 2)), elector=electors[n],
                          writer=log.writer(ScaleClient(api, ScaleTarget("web")), n))[0]
            for n, api in apis.items()
        }  # fmt: skip
        async with anyio.create_task_group() as outer:
            scopes: dict[str, anyio.CancelScope] = {}

            async def run(n: str) -> None:
                with anyio.CancelScope() as scope:
                    scopes[n] = scope
                    await ctls[n].run()

            outer.start_soon(run, "a")
            await eventually("a leads", electors["a"].is_leader)
            outer.start_soon(run, "b")
            await eventually("a patches", lambda: len(log.entries) >= 3)
            await anyio.sleep(2 * RETRY_S)  # b has tried and waits
            assert not electors["b"].is_leader()
            assert set(log.authors()) == {"a"}

            scopes["a"].cancel()  # the kill: no release
            killed = time.monotonic()
            await eventually("b patches", lambda: "b" in log.authors(), LEASE_S + 10)
            took_over = min(start for who, start, _ in log.entries if who == "b")
            # about one lease duration: the lease runs out, then b's next retry, then its
            # next tick (and scheduling slack on a shared machine)
            assert took_over - killed <= LEASE_S + RETRY_S + ctls["b"].interval_s + 2.0
            await eventually("b patches more", lambda: log.authors().count("b") >= 3)
            outer.cancel_scope.cancel()
        authors = log.authors()
        switch = authors.index("b")
        assert set(authors[:switch]) == {"a"} and set(authors[switch:]) == {"b"}
        last_a = max(end for who, _, end in log.entries if who == "a")
        assert last_a < took_over  # never both at once
    finally:
        for api in apis.values():
            api.close()
