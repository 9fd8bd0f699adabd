"""The emulator's fault knobs (``/_sim/faults``), each seen through the real client; they
never apply to ``/_sim/``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import kubernetes
import pytest
import urllib3
from kubernetes.client.rest import ApiException

from tests.kube.kubehelpers import NS, wait_for
from tests.kube.simproc import KubeSimProcess

LEASE = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}
CLEAR = {"error_rate": 0.0, "latency_s": 0.0, "gone_watches": 0, "conflicts": 0}


@pytest.fixture(scope="module")
def shared_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeSimProcess]:
    """One emulator for this module (each test uses its own objects)."""
    with KubeSimProcess(tmp_path_factory.mktemp("kube-sim-faults")) as sim:
        yield sim


@pytest.fixture
def kube_sim(shared_sim: KubeSimProcess) -> Iterator[KubeSimProcess]:
    """The shared emulator with every knob cleared before and after the test."""
    shared_sim.faults(**CLEAR)
    yield shared_sim
    shared_sim.faults(**CLEAR)


def test_error_rate_answers_500_status(kube_sim: KubeSimProcess) -> None:
    v1 = kubernetes.client.CoreV1Api(kube_sim.api())
    assert kube_sim.faults(error_rate=1.0)["error_rate"] == 1.0
    with pytest.raises(ApiException) as err:
        v1.list_namespaced_pod(NS)
    body = json.loads(err.value.body)
    assert err.value.status == 500 and (body["kind"], body["reason"]) == ("Status", "InternalError")
    assert kube_sim.state()["faults"]["error_rate"] == 1.0  # /_sim/ is never faulted
    kube_sim.faults(error_rate=0.5)
    codes = []
    for _ in range(40):
        try:
            v1.list_namespaced_pod(NS)
            codes.append(200)
        except ApiException as exc:
            codes.append(exc.status)
    assert set(codes) == {200, 500}
    kube_sim.faults(error_rate=0.0)
    v1.list_namespaced_pod(NS)


def test_latency_delays_every_api_answer(kube_sim: KubeSimProcess) -> None:
    v1 = kubernetes.client.CoreV1Api(kube_sim.api())
    kube_sim.faults(latency_s=0.3)
    t0 = time.monotonic()
    v1.list_namespaced_pod(NS)
    assert time.monotonic() - t0 >= 0.3  # a lower bound: the answer waited at least that long
    with pytest.raises(urllib3.exceptions.MaxRetryError):  # the client times out (3 tries)
        v1.list_namespaced_pod(NS, _request_timeout=0.05)
    kube_sim.faults(latency_s=0)


def test_conflicts_answer_409_to_the_next_writes(kube_sim: KubeSimProcess) -> None:
    co = kubernetes.client.CoordinationV1Api(kube_sim.api())
    kube_sim.faults(conflicts=2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            co.create_namespaced_lease(NS, LEASE)
        assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"
    assert kube_sim.faults()["conflicts"] == 0
    co.list_namespaced_lease(NS)  # reads never conflict
    assert co.create_namespaced_lease(NS, LEASE).metadata.name == "l"


def test_gone_watches_answer_410_to_the_next_watches(kube_sim: KubeSimProcess) -> None:
    v1 = kubernetes.client.CoreV1Api(kube_sim.api())
    rv = v1.list_namespaced_pod(NS).metadata.resource_version
    kube_sim.faults(gone_watches=1)
    w = kubernetes.watch.Watch()
    with pytest.raises(ApiException) as err:
        list(w.stream(v1.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=2))
    assert err.value.status == 410
    assert list(w.stream(v1.list_namespaced_pod, NS, resource_version=rv,
                         timeout_seconds=1)) == []  # fmt: skip


def test_cut_watches_ends_open_streams_once(kube_sim: KubeSimProcess) -> None:
    v1 = kubernetes.client.CoreV1Api(kube_sim.api())
    ended = threading.Event()

    def follow() -> None:
        w = kubernetes.watch.Watch()
        for _ in w.stream(v1.list_namespaced_pod, NS, timeout_seconds=60):
            pass
        ended.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    wait_for("the watch to open", lambda: kube_sim.state()["watches"] == 1)
    assert kube_sim.faults(cut_watches=True)["cut_watches"] is False  # a one-shot action
    assert ended.wait(10)  # long before its 60 s timeout
    assert kube_sim.state()["watches"] == 0


def test_invalid_knobs_are_refused(kube_sim: KubeSimProcess) -> None:
    for body in ({"error_rate": 2}, {"nope": 1}, {"conflicts": "x"}, {"cut_watches": 1}):
        resp = httpx.put(f"{kube_sim.url}/_sim/faults", json=body, timeout=10)
        assert resp.status_code == 400, body
    assert httpx.get(f"{kube_sim.url}/_sim/faults", timeout=10).json()["error_rate"] == 0.0
