"""Kubernetes discovery with the real ``kubernetes`` client against the emulated API server.

The emulator (``switchyard kube-sim``, the ``kube_sim`` fixture) runs Deployments whose pods
are enginesim engines with a cold start; these tests scale them, force pods not Ready, and
inject 410s, cut watches and API 500s, and check that the gateway's engine pool follows
each change within 2 s (a functional bound from issue 12, polled with a bounded wait: the
state must be reached before the deadline). One test serves a chat completion through a
gateway to an engine pod it discovered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import openai
import pytest
from kubernetes import client

from gateway.app import create_app
from gateway.discovery import ApiError, KubeApi, KubernetesDiscovery
from gateway.endpoints import EndpointRegistry
from gateway.settings import DiscoverySettings, Settings
from tests.gateway.servers import ServerThread, wait_until
from tests.kube.simproc import KubeSimProcess

pytestmark = pytest.mark.anyio

NS = "default"
SELECTOR = "app=engine"
MODEL = "smollm2"
FOLLOW_S = 2.0  # issue 12: the engine pool follows pod changes within 2 s


def deployment(name: str, replicas: int, *, cold_start_s: float, drain_s: float = 0.5) -> Any:
    labels = {"app": "engine", "switchyard.io/model": MODEL}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "engine"}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "sim.switchyard.io/profile": "cpu-smollm2",
                        "sim.switchyard.io/cold-start-s": str(cold_start_s),
                        "sim.switchyard.io/drain-s": str(drain_s),
                    },
                },
                "spec": {"containers": [{"name": "engine", "image": "enginesim"}]},
            },
        },
    }


class Cluster:
    """The emulator through the real client: deployments, scale, pods."""

    def __init__(self, sim: KubeSimProcess) -> None:
        self.sim = sim
        self.api_client = sim.api()
        self.apps = client.AppsV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def create(self, name: str, replicas: int, *, cold_start_s: float = 0.5) -> None:
        body = deployment(name, replicas, cold_start_s=cold_start_s)
        self.apps.create_namespaced_deployment(NS, body, _request_timeout=5)

    def scale(self, name: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(
            name, NS, {"spec": {"replicas": replicas}}, _request_timeout=5
        )

    def pods(self) -> list[Any]:
        return list(
            self.core.list_namespaced_pod(NS, label_selector=SELECTOR, _request_timeout=5).items
        )

    def ready(self) -> set[str]:
        """Pods the API shows Ready and not terminating (what discovery must register)."""
        out = set()
        for pod in self.pods():
            conds = pod.status.conditions or []
            is_ready = any(c.type == "Ready" and c.status == "True" for c in conds)
            if is_ready and pod.metadata.deletion_timestamp is None:
                out.add(pod.metadata.name)
        return out

    def names(self) -> set[str]:
        return {pod.metadata.name for pod in self.pods()}


def ids(registry: EndpointRegistry) -> set[str]:
    return {state.id for state in registry}


def only_ready(registry: EndpointRegistry, cluster: Cluster) -> bool:
    """Asserts no engine is a pod the API does not show Ready (the registry read first: an
    engine there was Ready before the API read), then returns True."""
    engines = ids(registry)
    ready = cluster.ready()
    assert engines <= ready, f"engines {engines - ready} registered before they were Ready"
    return True


async def until(cond: Callable[[], bool], what: str, timeout_s: float = FOLLOW_S) -> None:
    """Poll until ``cond`` holds; fail naming ``what`` if it did not within ``timeout_s``."""
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await anyio.sleep(0.02)
    assert cond(), f"not reached within {timeout_s}s: {what}"


async def api_until(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Like :func:`until` for conditions read from the API (each read in a thread)."""
    for _ in range(int(timeout_s / 0.05)):
        if await anyio.to_thread.run_sync(cond):
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"not reached within {timeout_s}s: {what}")


def settings_for(sim: KubeSimProcess, **overrides: Any) -> DiscoverySettings:
    base: dict[str, Any] = {
        "kind": "kubernetes",
        "selector": SELECTOR,
        "kubeconfig": sim.kubeconfig,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.4,
        "watch_timeout_s": 5,
        "request_timeout_s": 2.0,
    }
    return DiscoverySettings(**{**base, **overrides})


@asynccontextmanager
async def discovering(sim: KubeSimProcess, **overrides: Any) -> AsyncIterator[KubernetesDiscovery]:
    """Discovery on a fresh registry, listed once and watching until the block exits, then
    shut down as the gateway does (cancel, then ``close()``); the watch must be gone right
    after (shutdown does not wait for the server). ``close()`` comes first because a watch
    being opened in an abandoned worker thread at the cancel (after a relist) arrives later;
    it is stopped when it does (test_a_watch_opened_after_close_is_stopped_at_once)."""
    discovery = KubernetesDiscovery(settings_for(sim, **overrides), endpoints=EndpointRegistry())
    assert await discovery.sync_once()
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery.run)
        yield discovery
        tg.cancel_scope.cancel()
    discovery.close()
    api = discovery.api
    assert isinstance(api, KubeApi)
    await until(lambda: api.open_watches == 0, "the watch closed after the shutdown")
    # ...on the server's side too: its socket was shut down, not left to its timeout.
    await api_until(lambda: sim.state()["watches"] == 0, "the server saw it go", FOLLOW_S)


async def ready_engines(sim: KubeSimProcess, replicas: int) -> Cluster:
    """The Deployment ``engine`` created with ``replicas`` pods, once the API shows them Ready."""
    cluster = Cluster(sim)
    await anyio.to_thread.run_sync(lambda: cluster.create("engine", replicas))
    await api_until(lambda: len(cluster.ready()) == replicas, f"{replicas} pod(s) Ready")
    return cluster


async def unready(sim: KubeSimProcess, pods: set[str]) -> str:
    """Forces the first of ``pods`` (by name) not Ready; returns its name."""
    victim = sorted(pods)[0]
    await anyio.to_thread.run_sync(sim.set_ready, NS, victim, False)
    return victim


def registry_of(discovery: KubernetesDiscovery) -> EndpointRegistry:
    return discovery._endpoints


async def test_scale_up_adds_ready_pods_scale_down_removes(
    kube_sim: KubeSimProcess,
) -> None:
    cluster = Cluster(kube_sim)
    async with discovering(kube_sim) as discovery:
        registry = registry_of(discovery)
        await anyio.to_thread.run_sync(lambda: cluster.create("engine", 1, cold_start_s=2))
        await api_until(lambda: len(cluster.names()) == 1, "the first pod created")
        await api_until(lambda: only_ready(registry, cluster) and len(cluster.ready()) == 1,
                        "the first pod Ready (never an engine before)")  # fmt: skip
        first = cluster.ready()
        await until(lambda: ids(registry) == first, "the Ready pod added")
        state = registry.get(next(iter(first)))
        assert state is not None and state.url.startswith("http://127.0.0.1:")
        assert [card.id for card in state.models] == [MODEL]

        await anyio.to_thread.run_sync(cluster.scale, "engine", 3)
        await api_until(lambda: len(cluster.names()) == 3, "scaled to 3")
        await api_until(lambda: only_ready(registry, cluster) and len(cluster.ready()) == 3,
                        "three pods Ready (none an engine before)")  # fmt: skip
        ready = cluster.ready()
        await until(lambda: ids(registry) == ready, "the new pods added once Ready")
        assert discovery.stats.events["modified"] > 0

        await anyio.to_thread.run_sync(cluster.scale, "engine", 1)
        await api_until(lambda: len(cluster.ready()) == 1, "two pods terminating")
        left = cluster.ready()
        await until(lambda: ids(registry) == left, "terminating pods removed")
        await api_until(lambda: len(cluster.names()) == 1, "drained pods deleted")
        assert ids(registry) == left


async def test_a_pod_forced_not_ready_is_removed_then_added_back(kube_sim: KubeSimProcess) -> None:
    cluster = await ready_engines(kube_sim, 2)
    async with discovering(kube_sim) as discovery:
        registry = registry_of(discovery)
        both = cluster.ready()
        assert ids(registry) == both  # the first list
        victim = await unready(kube_sim, both)
        await until(lambda: ids(registry) == both - {victim}, "the not-ready pod removed")
        await anyio.to_thread.run_sync(kube_sim.set_ready, NS, victim, True)
        await until(lambda: ids(registry) == both, "the pod added back once Ready")


@pytest.mark.parametrize("fault", ["gone", "cut"])
async def test_410_and_cut_watches_relist_and_keep_following(
    kube_sim: KubeSimProcess, fault: str
) -> None:
    cluster = await ready_engines(kube_sim, 2)
    async with discovering(kube_sim) as discovery:
        registry = registry_of(discovery)
        both = cluster.ready()
        await until(lambda: kube_api(discovery).open_watches == 1, "watching")
        if fault == "gone":  # the open watch is cut; the next watch request answers 410
            await anyio.to_thread.run_sync(lambda: kube_sim.faults(gone_watches=1))
        await anyio.to_thread.run_sync(lambda: kube_sim.faults(cut_watches=True))
        await until(lambda: discovery.stats.relists[fault] >= 1, f"a relist after {fault}")
        assert ids(registry) == both  # nothing lost meanwhile
        victim = await unready(kube_sim, both)
        await until(lambda: ids(registry) == both - {victim}, "followed after the relist")


@pytest.mark.parametrize(
    ("fault", "healed"),
    [({"error_rate": 1.0}, {"error_rate": 0.0}),  # every API answer a 500
     ({"latency_s": 3.0}, {"latency_s": 0.0})],  # answers slower than request_timeout_s
    ids=["500s", "slow"],
)  # fmt: skip
async def test_api_errors_keep_the_engines(
    kube_sim: KubeSimProcess, fault: dict[str, float], healed: dict[str, float]
) -> None:
    cluster = await ready_engines(kube_sim, 2)
    async with discovering(kube_sim) as discovery:
        registry = registry_of(discovery)
        both = cluster.ready()
        await until(lambda: kube_api(discovery).open_watches == 1, "watching")
        await anyio.to_thread.run_sync(lambda: kube_sim.faults(**fault, cut_watches=True))
        await until(lambda: discovery.stats.errors >= 2, "two failed calls", 15)
        assert ids(registry) == both  # API errors never remove an engine
        victim = await unready(kube_sim, both)  # unseen yet
        await anyio.to_thread.run_sync(lambda: kube_sim.faults(**healed))
        # Within the 2 s once the API answers again: at most a call already under way (its
        # request_timeout_s) and one capped backoff before the list that sees it.
        s = discovery.settings
        await until(lambda: ids(registry) == both - {victim}, "followed once the API answers",
                    FOLLOW_S + s.request_timeout_s + s.backoff_max_s)  # fmt: skip
        assert discovery.stats.relists["cut"] + discovery.stats.relists["error"] >= 1


async def test_watch_timeouts_rewatch_without_listing(kube_sim: KubeSimProcess) -> None:
    cluster = await ready_engines(kube_sim, 1)
    async with discovering(kube_sim, watch_timeout_s=1) as discovery:
        registry = registry_of(discovery)
        await until(lambda: kube_api(discovery).watches >= 3, "two watches ended on time", 5)
        assert discovery.stats.relists == {}  # ended by timeoutSeconds: watched again, no list
        victim = next(iter(cluster.ready()))
        await anyio.to_thread.run_sync(kube_sim.set_ready, NS, victim, False)
        await until(lambda: ids(registry) == set(), "still following")


@pytest.mark.parametrize("close_after_s", [0.0, 0.3])
def test_a_watch_opened_after_close_is_stopped_at_once(
    kube_sim: KubeSimProcess, close_after_s: float
) -> None:
    """A cancelled discovery abandons its worker threads: one still opening a watch when the
    API is closed must not leave that stream (and its socket) open. Whichever comes first, the
    close (the call is refused) or the request (usually, with the pause: its stream is
    stopped when it arrives), the outcome is the same, so the pause orders, never asserts."""
    api = KubeApi(settings_for(kube_sim))
    rv = api.list_pods().resource_version
    kube_sim.faults(latency_s=1.0)  # the watch's answer comes a second later
    outcome: list[object] = []

    def watch() -> None:
        try:
            outcome.append(api.watch_pods(rv))
        except ApiError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(close_after_s)
    api.close()
    thread.join(timeout=10.0)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ApiError), outcome
    assert api.open_watches == 0
    kube_sim.faults(latency_s=0.0)
    assert wait_until(lambda: kube_sim.state()["watches"] == 0, timeout=5.0)


def kube_api(discovery: KubernetesDiscovery) -> KubeApi:
    api = discovery.api
    assert isinstance(api, KubeApi)
    return api


def test_a_gateway_serves_a_chat_completion_on_a_discovered_pod(kube_sim: KubeSimProcess) -> None:
    cluster = Cluster(kube_sim)
    cluster.create("engine", 1)
    settings = Settings.model_validate({
        "discovery": settings_for(kube_sim),
        "health": {"interval_s": 0.2, "timeout_s": 1.0, "fail_threshold": 2,
                   "success_threshold": 1},
        "server": {"access_log": False},
        "proxy": {"connect_timeout_s": 1.0, "read_timeout_s": 10.0},
    })  # fmt: skip
    with ServerThread(create_app(settings)) as gateway:

        def listed() -> bool:
            models = httpx.get(f"{gateway.url}/v1/models", timeout=5).json()
            return MODEL in [m["id"] for m in models.get("data", [])]

        assert wait_until(listed, timeout=30), "the pod's model never listed"
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as sdk:
            chat = sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens == 4
        engines = httpx.get(f"{gateway.url}/admin/engines", timeout=5).json()["engines"]
        assert [e["id"] for e in engines] == sorted(cluster.ready())
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
        assert "switchyard_discovery_endpoints 1.0" in metrics
