"""The gateway's side of autoscaling: the settings section and the embedded source's signals
from the registry (fake target reader, fake clocks); where arrivals are counted:
tests/gateway/test_arrivals.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autoscale.arrivals import ArrivalCounter
from autoscale.kube import PodInfo, Scale, ScaleTarget
from autoscale.sources import TargetState
from gateway.autoscaling import GatewaySource
from gateway.endpoints import EndpointRegistry
from gateway.settings import Settings

pytestmark = pytest.mark.anyio


def test_settings_section_defaults_and_validation() -> None:
    s = Settings.model_validate(
        {"autoscaling": {"enabled": True, "policy": "hpa", "policy_settings": {"metric": "kv"},
                         "target": {"name": "llama", "namespace": "prod"},
                         "leader_election": {"identity": "gw-1"}}}
    )  # fmt: skip
    a = s.autoscaling
    assert a.target.target() == ScaleTarget("llama", "prod", "apps/v1", "deployments")
    assert a.lease_namespace == "prod" and a.interval_s == 1.0
    assert a.leader_election.resolved_identity() == "gw-1"
    assert (a.leader_election.lease_duration_s, a.leader_election.renew_deadline_s,
            a.leader_election.retry_period_s) == (15.0, 10.0, 2.0)  # fmt: skip
    assert a.limits().max_replicas == 8
    other = Settings.model_validate(
        {"autoscaling": {"target": {"kind": "StatefulSet", "name": "x"}}}
    ).autoscaling.target.target()
    assert other.resource == "statefulsets"
    assert "_" in Settings().autoscaling.leader_election.resolved_identity()  # host_pid
    bad: list[dict[str, Any]] = [
        {"enabled": True},  # no target name
        {"policy": "nope"},
        {"policy": "hpa", "policy_settings": {"metric": "cpu"}},
        {"min_replicas": 5, "max_replicas": 2},
        {"leader_election": {"lease_duration_s": 5, "renew_deadline_s": 10}},
        {
            "leader_election": {
                "lease_duration_s": 2.5,
                "renew_deadline_s": 2,
                "retry_period_s": 0.5,
            }
        },
        {"surprise": 1},
    ]
    for section in bad:
        with pytest.raises(ValidationError):
            Settings.model_validate({"autoscaling": section})
    with pytest.raises(ValidationError, match="needs leader_election"):
        Settings.model_validate(
            {
                "server": {"workers": 2},
                "autoscaling": {
                    "enabled": True,
                    "target": {"name": "x"},
                    "leader_election": {"enabled": False},
                },
            }
        )


def test_env_configures_the_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_AUTOSCALING__MAX_REPLICAS", "12")
    assert Settings.load().autoscaling.max_replicas == 12


class Reader:
    def __init__(self, pods: list[PodInfo], replicas: int) -> None:
        self.pods = pods
        self.replicas = replicas

    async def read(self) -> TargetState:
        return TargetState(Scale(self.replicas, len(self.pods), "app=x"), tuple(self.pods))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


async def test_gateway_source_reads_the_registry_and_the_arrivals() -> None:
    registry = EndpointRegistry()
    a = registry.add("http://127.0.0.1:9001", endpoint_id="pod-a")
    registry.add("http://127.0.0.1:9002", endpoint_id="static-engine")  # not the target's
    lease = a.lease(prompt_tokens=800, max_tokens=100)
    arrivals = ArrivalCounter()
    clock, wall = Clock(), [50.0]
    reader = Reader([PodInfo("pod-a", "10.0.0.1", True), PodInfo("pod-b", "10.0.0.2", False)],
                    replicas=3)  # fmt: skip
    source = GatewaySource(reader=reader, endpoints=registry, arrivals=arrivals, clock=clock,
                           model="m", stale_after_s=5.0, monotonic=lambda: wall[0])  # fmt: skip
    first = await source.observe()
    assert (first.current, first.ready, first.pending, first.stale) == (3, 1, 2, False)
    pa, pb = first.engines
    assert (pa.id, pa.in_flight, pa.in_flight_tokens, pa.queued_prompt_tokens) == (
        "pod-a", 1, 900, 800)  # fmt: skip
    assert pa.kv_usage is None  # never scraped
    assert (pb.id, pb.ready, pb.in_flight) == ("pod-b", False, 0)  # not in the pool yet
    lease.first_token(ttft_s=0.3)
    for _ in range(6):
        arrivals.arrived("m", prompt_tokens=100, max_tokens=20)
    arrivals.arrived("other-model", prompt_tokens=5000, max_tokens=20)
    clock.t = 2.0
    second = await source.observe()
    assert (second.arrival_rate, second.prompt_token_rate, second.output_token_rate) == (
        3.0, 300.0, 60.0)  # fmt: skip
    assert second.engines[0].queued_prompt_tokens == 0 and second.engines[0].ttft_s == 0.3
    wall[0] = 56.0  # a ready pod never scraped for longer than stale_after_s
    third = await source.observe()
    assert third.stale
    # No first token since the last reading: no TTFT (the EWMA never fades; an idle fleet
    # must not read as its last busy period), though the EWMA still holds 0.3.
    assert third.engines[0].ttft_s is None and a.snapshot().ttft_ewma_s == pytest.approx(0.3)
    again = a.lease(prompt_tokens=10, max_tokens=10)
    again.first_token(ttft_s=0.3)
    source.latency_scale = 10.0  # compressed time: the gateway's wall seconds, scaled
    assert (await source.observe()).engines[0].ttft_s == pytest.approx(3.0)
    lease.release()
    again.release()


async def test_a_ready_pod_outside_the_pool_contributes_its_readiness_only() -> None:
    """A Ready pod discovery did not register (another namespace or selector, a skipped
    pod, static discovery) has no scrape time; it must not hold the loop as stale."""
    registry = EndpointRegistry()
    wall = [0.0]
    reader = Reader([PodInfo("pod-a", "10.0.0.1", True)], replicas=1)
    source = GatewaySource(reader=reader, endpoints=registry, arrivals=ArrivalCounter(),
                           clock=Clock(), stale_after_s=5.0, monotonic=lambda: wall[0])  # fmt: skip
    for t in (0.0, 3.0, 6.0, 60.0):
        wall[0] = t
        obs = await source.observe()
        assert (obs.ready, obs.stale) == (1, False)


async def test_without_scraping_only_the_gateway_counts_are_used() -> None:
    registry = EndpointRegistry()
    registry.add("http://127.0.0.1:9001", endpoint_id="pod-a")
    wall = [0.0]
    source = GatewaySource(reader=Reader([PodInfo("pod-a", "10.0.0.1", True)], replicas=1),
                           endpoints=registry, arrivals=ArrivalCounter(), clock=Clock(),
                           scraped=False, monotonic=lambda: wall[0])  # fmt: skip
    await source.observe()
    wall[0] = 1000.0
    assert not (await source.observe()).stale
