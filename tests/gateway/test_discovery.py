"""gateway.discovery's loop against an in-memory PodApi (no client, no server): list, watch
events, 410 and cut watches relist, API errors keep the engines, static engines untouched,
metrics, cancellation. The real client against the emulated API: tests/kube/."""

from __future__ import annotations

import itertools
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import orjson
import pytest
import urllib3
from kubernetes.client.exceptions import ApiException
from prometheus_client import generate_latest
from starlette.requests import Request

from gateway import discovery as discovery_module
from gateway.discovery import (
    ApiError,
    DiscoveryError,
    Gone,
    KubeApi,
    KubernetesDiscovery,
    PodList,
    WatchCut,
    _mapped,
)
from gateway.endpoints import EndpointRegistry, EndpointState
from gateway.metrics import GatewayMetrics
from gateway.routes import ops
from gateway.services import Services
from gateway.settings import DiscoverySettings, EngineConfig, Settings
from tests.gateway.test_pods import MODEL, pod

pytestmark = pytest.mark.anyio

SETTINGS = DiscoverySettings(
    kind="kubernetes", selector="app=engine", backoff_initial_s=0.01, backoff_max_s=0.05
)


class FakeWatch:
    """Events put by the test; ``end()`` ends the stream cleanly, ``fail(exc)`` raises."""

    def __init__(self) -> None:
        self.q: queue.Queue[Mapping[str, Any] | BaseException | None] = queue.Queue()
        self.stopped = threading.Event()

    def next_event(self) -> Mapping[str, Any] | None:
        item = self.q.get(timeout=5)  # bounded: a test that forgets to feed it ends
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self.stopped.set()
        self.q.put(None)


class FakeApi:
    """Pods by name; every call counted; ``list_errors``/``watch_errors`` fail the next calls."""

    def __init__(self, *pods: dict[str, Any]) -> None:
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.rv = 10
        self.lists = 0
        self.list_errors: list[DiscoveryError] = []
        self.watch_errors: list[DiscoveryError] = []
        self.watches: list[tuple[str, FakeWatch]] = []
        self.closed = False

    def list_pods(self) -> PodList:
        self.lists += 1
        if self.list_errors:
            raise self.list_errors.pop(0)
        return PodList(tuple(self.pods.values()), str(self.rv))

    def watch_pods(self, resource_version: str) -> FakeWatch:
        if self.watch_errors:
            raise self.watch_errors.pop(0)
        watch = FakeWatch()
        self.watches.append((resource_version, watch))
        return watch

    def close(self) -> None:
        self.closed = True

    def event(self, kind: str, doc: dict[str, Any]) -> None:
        """Change the pod and send the event on the newest watch."""
        self.rv += 1
        doc["metadata"]["resourceVersion"] = str(self.rv)
        if kind == "DELETED":
            self.pods.pop(doc["metadata"]["name"], None)
        else:
            self.pods[doc["metadata"]["name"]] = doc
        self.watches[-1][1].q.put({"type": kind, "object": doc})


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 2.0) -> None:
    """Poll ``cond`` until true; fail naming ``what`` once ``timeout_s`` has passed."""
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await anyio.sleep(0.01)
    assert cond(), f"not reached within {timeout_s}s: {what}"


def ids(registry: EndpointRegistry) -> set[str]:
    return {state.id for state in registry}


def make(
    api: FakeApi,
    registry: EndpointRegistry | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[KubernetesDiscovery, EndpointRegistry, list[str], list[str]]:
    registry = registry or EndpointRegistry()
    added: list[str] = []
    removed: list[str] = []

    async def on_added(state: EndpointState) -> None:
        added.append(state.id)

    discovery = KubernetesDiscovery(
        SETTINGS, endpoints=registry, api=api, on_added=on_added, on_removed=removed.append,
        rng=random.Random(1), clock=clock,
    )  # fmt: skip
    return discovery, registry, added, removed


async def test_list_adds_ready_pods_with_their_model_and_port() -> None:
    api = FakeApi(
        pod("a", labels=MODEL, annotations={"switchyard.io/port": "8101",
                                            "switchyard.io/kv-events-port": "5557"}),
        pod("b", ready="False"),
        pod("c", deleting=True),
    )  # fmt: skip
    discovery, registry, _, _ = make(api)
    assert await discovery.sync_once()
    assert ids(registry) == {"a"}
    state = registry.get("a")
    assert state is not None and state.url == "http://10.0.0.7:8101"
    assert state.kv_events == "tcp://10.0.0.7:5557"  # KVEventConsumers subscribe to it
    assert [card.id for card in state.models] == ["smollm2"]  # routable before /v1/models
    assert state.snapshot().models == frozenset({"smollm2"})


async def test_watch_events_follow_pods() -> None:
    api = FakeApi(pod("a"))
    ticks = itertools.count(0, 100)  # every reading 100 s on: each watch lasts its timeout
    discovery, registry, added, removed = make(api, clock=lambda: next(ticks))
    assert await discovery.sync_once()
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery.run)
        await until(lambda: len(api.watches) == 1, "a watch")
        assert api.watches[0][0] == "10"  # from the list's resourceVersion
        api.event("ADDED", pod("b", ready="False"))
        api.event("MODIFIED", pod("b"))
        await until(lambda: ids(registry) == {"a", "b"}, "b added once Ready")
        await until(lambda: added == ["b"], "b handed to on_added")
        api.event("MODIFIED", pod("a", ready="False"))
        await until(lambda: ids(registry) == {"b"}, "a removed: not ready")
        api.event("MODIFIED", pod("a"))
        await until(lambda: ids(registry) == {"a", "b"}, "a back")
        api.event("MODIFIED", pod("b", ip="10.0.0.8"))
        await until(
            lambda: (s := registry.get("b")) is not None and s.url == "http://10.0.0.8:8000",
            "b re-added at its new url",
        )
        api.event("MODIFIED", pod("a", deleting=True))
        await until(lambda: ids(registry) == {"b"}, "a removed: terminating")
        api.event("DELETED", pod("a", deleting=True))
        api.event("DELETED", pod("b"))
        await until(lambda: ids(registry) == set(), "b removed: deleted")
        api.watches[-1][1].q.put({"type": "BOOKMARK", "object": {"metadata": {
            "resourceVersion": "99"}}})  # fmt: skip
        api.watches[-1][1].q.put(None)  # the server's timeoutSeconds
        await until(lambda: len(api.watches) == 2, "watched again")
        tg.cancel_scope.cancel()
    assert api.watches[1][0] == "99"  # from the bookmark, without a list
    assert api.lists == 1
    assert removed == ["a", "b", "a", "b"]
    assert discovery.stats.events == {"added": 1, "modified": 5, "deleted": 2, "bookmark": 1}
    assert all(w.stopped.is_set() for _, w in api.watches)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("error_event", "gone"),
        ("gone_on_open", "gone"),
        ("cut", "cut"),
        ("early_end", "cut"),
        ("error_event_500", "error"),
        ("api_error_on_open", "error"),
    ],
)
async def test_relist_after_a_broken_watch(fault: str, reason: str) -> None:
    api = FakeApi(pod("a"), pod("b"))
    now = [0.0]
    discovery, registry, added, _ = make(api, clock=lambda: now[0])
    assert await discovery.sync_once()
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery.run)
        await until(lambda: len(api.watches) == 1, "a watch")
        if fault.endswith("_on_open"):
            now[0] += 30  # the first watch ends at its timeout; the next one fails to open
        # While the watch is broken: b goes, c comes (seen only by the list).
        del api.pods["b"]
        api.pods["c"] = pod("c")
        if fault == "gone_on_open":
            api.watch_errors.append(Gone("410"))
            api.watches[0][1].q.put(None)
        elif fault == "api_error_on_open":
            api.watch_errors.append(ApiError("500"))
            api.watches[0][1].q.put(None)
        elif fault == "cut":
            api.watches[0][1].q.put(WatchCut("reset"))
        elif fault == "early_end":
            api.watches[0][1].q.put(None)  # clean, but long before its 30 s timeout
        else:
            code = 410 if fault == "error_event" else 500
            api.watches[0][1].q.put({"type": "ERROR", "object": {"code": code, "message": "x"}})
        await until(lambda: ids(registry) == {"a", "c"}, "relisted")
        await until(lambda: added == ["c"], "c probed")
        tg.cancel_scope.cancel()
    assert api.lists == 2
    assert discovery.stats.relists == {reason: 1}
    assert discovery.stats.errors == (1 if reason == "error" else 0)


async def test_a_fractional_watch_timeout_ends_cleanly_at_its_whole_seconds() -> None:
    """timeoutSeconds is whole seconds (3.4 -> 3): a watch the server ends at 3 s is its
    normal end, not a cut (it was compared with 0.9 x 3.4 = 3.06 s: a relist every watch)."""
    api = FakeApi(pod("a"))
    now = [0.0]
    settings = SETTINGS.model_copy(update={"watch_timeout_s": 3.4})
    discovery = KubernetesDiscovery(
        settings, endpoints=EndpointRegistry(), api=api, rng=random.Random(1),
        clock=lambda: now[0],
    )  # fmt: skip
    assert await discovery.sync_once()
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery.run)
        await until(lambda: len(api.watches) == 1, "a watch")
        now[0] += 3.0  # the server's timeoutSeconds=3
        api.watches[0][1].q.put(None)
        await until(lambda: len(api.watches) == 2, "watched again")
        tg.cancel_scope.cancel()
    assert api.lists == 1 and discovery.stats.relists == {}


async def test_api_errors_keep_the_engines_and_back_off() -> None:
    api = FakeApi(pod("a"))
    discovery, registry, _, _ = make(api)
    api.list_errors.extend([ApiError("500")] * 3)
    assert not await discovery.sync_once()
    assert ids(registry) == set() and discovery.stats.errors == 1
    assert await discovery.sync_once() is False
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery.run)
        await until(lambda: ids(registry) == {"a"}, "listed once the API answers")
        await until(lambda: len(api.watches) == 1, "a watch")
        api.list_errors.extend([ApiError("500")] * 5)
        api.watches[0][1].q.put(WatchCut("reset"))  # relists fail five times
        await until(lambda: api.lists == 9, "five failed lists, then one that works", 5)
        assert ids(registry) == {"a"}  # never removed by an error
        await until(lambda: len(api.watches) == 2, "watching again")
        tg.cancel_scope.cancel()
    assert discovery.stats.errors == 3 + 5


def test_backoff_is_capped_exponential_with_jitter() -> None:
    settings = DiscoverySettings(
        kind="kubernetes", selector="a=b", backoff_initial_s=0.5, backoff_max_s=4.0
    )
    discovery = KubernetesDiscovery(settings, endpoints=EndpointRegistry(), api=FakeApi())
    assert discovery._backoff_s() == 0.0
    for failures, full in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (60, 4.0)]:
        discovery._failures = failures
        waits = [discovery._backoff_s() for _ in range(50)]
        assert all(full / 2 <= w <= full for w in waits), (failures, waits)
        assert len(set(waits)) > 1  # jittered


async def test_static_engines_are_never_touched() -> None:
    registry = EndpointRegistry()
    registry.add("http://10.9.9.9:8000", endpoint_id="a")  # configured, named like a pod
    registry.add("http://10.9.9.8:8000", endpoint_id="static")
    api = FakeApi(pod("a"), pod("b"))
    discovery, registry, _, _ = make(api, registry)
    assert await discovery.sync_once()
    assert ids(registry) == {"a", "static", "b"}
    state = registry.get("a")
    assert state is not None and state.url == "http://10.9.9.9:8000"  # the configured one
    api.pods.clear()
    assert await discovery.sync_once()  # every pod gone
    assert ids(registry) == {"a", "static"}
    assert discovery.owned == {}


async def test_metrics_in_the_app_registry() -> None:
    api = FakeApi(pod("a"), pod("b"))
    discovery, registry, _, _ = make(api)
    metrics = GatewayMetrics.create(registry)
    metrics.registry.register(discovery.collector())
    api.list_errors.append(ApiError("500"))
    assert not await discovery.sync_once()
    assert await discovery.sync_once()
    discovery.stats.events["added"] += 2
    discovery.stats.relists["gone"] += 1
    text = generate_latest(metrics.registry).decode()
    assert "switchyard_discovery_endpoints 2.0" in text
    assert 'switchyard_discovery_events_total{type="added"} 2.0' in text
    assert 'switchyard_discovery_relists_total{reason="gone"} 1.0' in text
    assert "switchyard_discovery_errors_total 1.0" in text


async def test_cancelling_run_stops_the_watch_at_once() -> None:
    api = FakeApi(pod("a"))
    discovery, _, _, _ = make(api)
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery.run)
        await until(lambda: len(api.watches) == 1, "a watch")
        tg.cancel_scope.cancel()  # next_event blocks in its thread: abandoned, then stopped
    assert api.watches[0][1].stopped.is_set()


async def test_services_run_discovery_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.model_validate({
        "engines": [EngineConfig(url="http://127.0.0.1:9", id="static")],
        "discovery": SETTINGS,
        "routing": {"scrape_interval_s": 0},
        "health": {"interval_s": 60, "timeout_s": 0.2},
    })  # fmt: skip
    api = FakeApi(pod("p1", ip="127.0.0.1", annotations={"switchyard.io/port": "9"}))
    monkeypatch.setattr(discovery_module, "KubeApi", lambda settings: api)  # no cluster here
    async with Services.open(settings) as services:
        assert ids(services.endpoints) == {"static", "p1"}  # listed before serving
        await until(lambda: len(api.watches) == 1, "the supervised watch")
        api.event("DELETED", pod("p1"))
        await until(lambda: ids(services.endpoints) == {"static"}, "p1 removed")
        assert b"switchyard_discovery_endpoints 0.0" in services.metrics.render()
        assert services.discovery is not None and services.discovery.api is api
    assert api.closed


async def test_ready_waits_for_the_first_list_not_for_a_healthy_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/ready``: 503 ``not_ready`` while discovery has never listed the pods (the replica
    does not know its pool), then 200 although no engine is healthy (gateway/routes/ops.py)."""
    settings = Settings.model_validate({
        "engines": [EngineConfig(url="http://127.0.0.1:9", id="static")],
        "discovery": SETTINGS,
        "routing": {"scrape_interval_s": 0},
        "health": {"interval_s": 0.05, "timeout_s": 0.2, "fail_threshold": 1},
    })  # fmt: skip
    api = FakeApi(pod("p1", ip="127.0.0.1", annotations={"switchyard.io/port": "9"}))
    api.list_errors.extend([ApiError("500")] * 100_000)  # until cleared below
    monkeypatch.setattr(discovery_module, "KubeApi", lambda settings: api)
    async with Services.open(settings) as services:
        probe = Request({"type": "http", "method": "GET", "path": "/ready", "headers": [],
                         "state": {"services": services}})  # fmt: skip
        await until(lambda: not any(state.healthy for state in services.endpoints), "down")
        resp = await ops.ready(probe)
        body = orjson.loads(resp.body)
        assert resp.status_code == 503 and body["status"] == "not_ready"
        assert body["error"]["code"] == "not_ready"
        assert resp.headers["retry-after"] == "1"
        assert body["discovery"] == {"listed": False, "engines": 0}
        assert [e["id"] for e in body["engines"]] == ["static"]
        api.list_errors.clear()
        await until(lambda: ids(services.endpoints) == {"static", "p1"}, "listed", 5)
        await until(lambda: not any(state.healthy for state in services.endpoints), "down")
        resp = await ops.ready(probe)
        body = orjson.loads(resp.body)
        assert (resp.status_code, body["status"], body["healthy_engines"]) == (200, "ready", 0)
        assert body["discovery"] == {"listed": True, "engines": 1}
        assert "error" not in body


def test_static_services_have_no_discovery() -> None:
    assert Services.build(Settings()).discovery is None


def test_settings_validation(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="selector is required"):
        DiscoverySettings(kind="kubernetes")
    with pytest.raises(ValueError, match="backoff_max_s"):
        DiscoverySettings(backoff_initial_s=2, backoff_max_s=1)
    with pytest.raises(ValueError, match="no file"):
        DiscoverySettings(kubeconfig=tmp_path / "missing")
    assert DiscoverySettings().kind == "static"
    loaded = Settings.load(None, discovery={"kind": "kubernetes", "selector": "app=vllm"})
    assert loaded.discovery.default_port == 8000
    assert loaded.discovery.model_label == "switchyard.io/model"


def kubeconfig(path: Any, server: str) -> Any:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: u, user: {token: dummy}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u, namespace: default}}]\n"
    )
    return path


async def test_kube_api_maps_transport_and_config_errors(tmp_path: Any) -> None:
    """The real client against a closed port and a broken kubeconfig: ApiError, no hang."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = SETTINGS.model_copy(update={
        "kubeconfig": kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{port}"),
        "request_timeout_s": 1.0})  # fmt: skip
    api = KubeApi(settings)
    with pytest.raises(ApiError, match="Connection"):
        await anyio.to_thread.run_sync(api.list_pods)
    with pytest.raises(ApiError):
        await anyio.to_thread.run_sync(api.watch_pods, "1")
    api.close()
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n")
    api = KubeApi(SETTINGS.model_copy(update={"kubeconfig": broken}))
    with pytest.raises(ApiError, match="cannot load the Kubernetes config"):
        api.list_pods()
    api.close()


@pytest.mark.parametrize(
    ("raised", "cut", "expected"),
    [
        (ApiException(status=410, reason="Gone"), False, Gone),
        (ApiException(status=500, reason="Internal"), False, ApiError),
        (ApiException(status=403, reason="Forbidden"), True, ApiError),
        (urllib3.exceptions.ProtocolError("Response ended prematurely"), True, WatchCut),
        (urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"), True, WatchCut),  # type: ignore[arg-type]
        (urllib3.exceptions.NewConnectionError(None, "refused"), False, ApiError),  # type: ignore[arg-type]
        (ConnectionResetError(), True, WatchCut),
    ],
)  # fmt: skip
def test_client_errors_map_to_discovery_errors(
    raised: Exception, cut: bool, expected: type[DiscoveryError]
) -> None:
    with pytest.raises(expected) as info, _mapped(cut=cut):
        raise raised
    assert type(info.value) is expected and info.value.__cause__ is raised
    with pytest.raises(KeyError), _mapped(cut=cut):  # not the API's: a bug, left alone
        raise KeyError("x")


def test_exports() -> None:
    assert discovery_module.__all__ == sorted(discovery_module.__all__)
    assert all(hasattr(discovery_module, name) for name in discovery_module.__all__)
    assert "KubernetesDiscovery" in discovery_module.__all__
