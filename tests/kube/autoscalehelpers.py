"""Helpers for the autoscaler's tests against the emulated API: targets, policies, sources."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

from autoscale.actuator import Actuator, Limits
from autoscale.controller import Controller, Elector
from autoscale.kube import KubeApi, ScaleClient, ScaleTarget
from autoscale.metrics import AutoscalerMetrics
from autoscale.signals import Decision, Observation
from autoscale.sources import TargetReader
from tests.kube.simproc import KubeSimProcess

NS = "default"
WAIT_S = 20.0


def plain_deployment(name: str, replicas: int) -> dict[str, Any]:
    """A Deployment whose pods are plain objects (no engine: nothing to scrape, never Ready)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }


def kube_api(sim: KubeSimProcess, *, timeout_s: float = 2.0) -> KubeApi:
    return KubeApi.from_kubeconfig(sim.kubeconfig, timeout_s=timeout_s)


async def create_deployment(api: KubeApi, name: str, replicas: int) -> None:
    path = f"/apis/apps/v1/namespaces/{NS}/deployments"
    await api.request("POST", path, body=plain_deployment(name, replicas))


async def replicas_of(api: KubeApi, name: str) -> int:
    return (await ScaleClient(api, ScaleTarget(name)).get()).spec_replicas


async def eventually(what: str, probe: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll ``probe`` (bounded) until it is true."""
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


class Wants:
    """A policy that wants ``n`` replicas (settable), or alternates between two numbers."""

    name = "wants"

    def __init__(self, n: int, *, alternate: tuple[int, int] | None = None) -> None:
        self.n = n
        self.alternate = alternate
        self.calls = 0

    def decide(self, obs: Observation) -> Decision:
        self.calls += 1
        if obs.stale:
            return Decision(obs.current, "stale")
        if self.alternate is not None:
            low, high = self.alternate
            want = high if obs.current == low else low
            return Decision(want, "flip")
        return Decision(self.n, "scale_up" if self.n > obs.current else "hold")


class ScaleSource:
    """Observations from the scale and the pods only (what a test's policy needs)."""

    def __init__(self, reader: TargetReader) -> None:
        self.reader = reader

    async def observe(self) -> Observation:
        state = await self.reader.read()
        return Observation(
            now=time.monotonic(), current=state.scale.spec_replicas, ready=state.ready
        )


@dataclass
class PatchLog:
    """Every scale patch of several controllers: (author, started, ended), wall-monotonic."""

    entries: list[tuple[str, float, float]] = field(default_factory=list)

    def writer(self, scales: ScaleClient, author: str) -> LoggedWriter:
        return LoggedWriter(scales, author, self)

    def authors(self) -> list[str]:
        return [a for a, _, _ in sorted(self.entries, key=lambda e: e[1])]


@dataclass
class LoggedWriter:
    scales: ScaleClient
    author: str
    log: PatchLog

    async def patch_replicas(self, replicas: int, *, timeout_s: float | None = None) -> object:
        started = time.monotonic()
        result = await self.scales.patch_replicas(replicas, timeout_s=timeout_s)
        self.log.entries.append((self.author, started, time.monotonic()))
        return result


def controller(
    api: KubeApi,
    name: str,
    policy: Wants,
    *,
    elector: Elector | None = None,
    writer: Any = None,
    limits: Limits | None = None,
    interval_s: float = 0.2,
) -> tuple[Controller, CollectorRegistry]:
    target = ScaleTarget(name)
    registry = CollectorRegistry()
    actuator = Actuator(
        limits or Limits(min_replicas=1, max_replicas=5, scale_down_cooldown_s=0),
        writer or ScaleClient(api, target),
    )
    ctl = Controller(
        source=ScaleSource(TargetReader(api, target)),
        policy=policy,
        actuator=actuator,
        metrics=AutoscalerMetrics(registry, policy=policy.name),
        elector=elector,
        interval_s=interval_s,
        max_backoff_s=0.5,
        patch_timeout_s=api.timeout_s,
        target=str(target),
    )
    return ctl, registry
