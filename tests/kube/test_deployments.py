"""Deployments run for real: pods backed by enginesim engines turn Ready after their cold start,
the scale subresource changes them, deleted pods drain their in-flight requests."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import httpx
import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from tests.kube.conftest import KubeSimFactory
from tests.kube.kubehelpers import (
    NS,
    engine_deployment,
    pod_ready,
    pods_of,
    ready_pods,
    wait_for,
)
from tests.kube.simproc import KubeSimProcess


def _engine_url(pod: Any) -> str:
    return f"http://{pod.status.pod_ip}:{pod.metadata.annotations['switchyard.io/port']}"


def test_deployment_pods_run_engines_and_turn_ready(kube_sim_factory: KubeSimFactory) -> None:
    sim = kube_sim_factory(speed=20)
    api = sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    start_rv = v1.list_namespaced_pod(NS).metadata.resource_version
    created = apps.create_namespaced_deployment(NS, engine_deployment("eng", 2, cold_start_s=2))
    assert created.metadata.generation == 1 and created.metadata.uid
    pods = wait_for("2 ready pods", lambda: ready_pods(v1, "eng", 2))
    for pod in pods:
        assert re.fullmatch(r"eng-[a-z]{5}", pod.metadata.name)
        assert pod.metadata.labels == {"app": "eng", "switchyard.io/model": "smollm2"}
        assert pod.metadata.owner_references[0].kind == "Deployment"
        assert pod.status.pod_ip == "127.0.0.1" and pod.status.phase == "Running"
        assert all(cs.ready for cs in pod.status.container_statuses)
        models = httpx.get(_engine_url(pod) + "/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "smollm2"
    assert len({p.metadata.annotations["switchyard.io/port"] for p in pods}) == 2
    # each pod was Running with Ready False (the cold start) before it turned Ready
    w = kubernetes.watch.Watch()
    history: dict[str, list[tuple[str | None, bool]]] = {}
    for e in w.stream(v1.list_namespaced_pod, NS, resource_version=start_rv, timeout_seconds=1):
        p = e["object"]
        history.setdefault(p.metadata.name, []).append((p.status.phase, pod_ready(p)))
    for states in history.values():
        assert states[0] == ("Pending", False)
        assert ("Running", False) in states
        assert states.index(("Running", False)) < states.index(("Running", True))
    dep = wait_for("deployment status", lambda: _status_ready(apps, "eng", 2))
    assert dep.status.observed_generation == dep.metadata.generation
    assert dep.status.updated_replicas == 2 and dep.status.available_replicas == 2


def _status_ready(apps: kubernetes.client.AppsV1Api, name: str, n: int) -> Any:
    dep = apps.read_namespaced_deployment(name, NS)
    ok = dep.status.replicas == n and dep.status.ready_replicas == n
    return dep if ok else None


def test_a_pod_is_not_ready_during_its_cold_start(kube_sim: KubeSimProcess) -> None:
    api = kube_sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    apps.create_namespaced_deployment(NS, engine_deployment("cold", 1, cold_start_s=3600))
    pod = wait_for("a running pod", lambda: [p for p in pods_of(v1, "cold")
                                            if p.status.phase == "Running"])[0]  # fmt: skip
    assert not pod_ready(pod)
    assert httpx.get(_engine_url(pod) + "/health", timeout=10).status_code == 503
    name = pod.metadata.name
    kube_sim.set_ready(NS, name, True)
    assert pod_ready(v1.read_namespaced_pod(name, NS))
    kube_sim.set_ready(NS, name, None)  # back to the engine's own readiness
    wait_for("not ready again", lambda: not pod_ready(v1.read_namespaced_pod(name, NS)))
    dep = apps.read_namespaced_deployment("cold", NS)
    assert dep.status.replicas == 1 and dep.status.ready_replicas == 0


def test_scale_subresource_get_patch_replace(kube_sim_factory: KubeSimFactory) -> None:
    sim = kube_sim_factory(speed=50)
    api = sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    apps.create_namespaced_deployment(NS, engine_deployment("eng", 1, cold_start_s=1))
    wait_for("1 ready pod", lambda: ready_pods(v1, "eng", 1))
    scale = apps.read_namespaced_deployment_scale("eng", NS)
    assert (scale.kind, scale.api_version) == ("Scale", "autoscaling/v1")
    assert scale.spec.replicas == 1 and scale.status.selector == "app=eng"
    # the client sends a dict body as a strategic merge patch
    patched = apps.patch_namespaced_deployment_scale("eng", NS, {"spec": {"replicas": 3}})
    assert patched.spec.replicas == 3
    wait_for("3 ready pods", lambda: ready_pods(v1, "eng", 3))
    assert apps.read_namespaced_deployment("eng", NS).metadata.generation == 2
    # a list body goes as a JSON patch
    ops = [{"op": "replace", "path": "/spec/replicas", "value": 2}]
    assert apps.patch_namespaced_deployment_scale("eng", NS, ops).spec.replicas == 2
    wait_for("2 ready pods", lambda: ready_pods(v1, "eng", 2))
    # a merge patch on the wire
    merge = {"Content-Type": "application/merge-patch+json"}
    resp = httpx.patch(f"{sim.url}/apis/apps/v1/namespaces/{NS}/deployments/eng/scale",
                       content=json.dumps({"spec": {"replicas": 1}}), headers=merge,
                       timeout=10)  # fmt: skip
    assert resp.status_code == 200 and resp.json()["spec"]["replicas"] == 1
    wait_for("1 ready pod", lambda: ready_pods(v1, "eng", 1))
    # replace (PUT) with the current resourceVersion, then with a stale one
    current = apps.read_namespaced_deployment_scale("eng", NS)
    stale_rv = current.metadata.resource_version
    current.spec.replicas = 2
    assert apps.replace_namespaced_deployment_scale("eng", NS, current).spec.replicas == 2
    current.metadata.resource_version = stale_rv
    current.spec.replicas = 5
    with pytest.raises(ApiException) as err:
        apps.replace_namespaced_deployment_scale("eng", NS, current)
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"
    with pytest.raises(ApiException) as err:
        apps.patch_namespaced_deployment_scale("eng", NS, {"spec": {"replicas": -1}})
    assert err.value.status == 422
    wait_for("2 ready pods", lambda: ready_pods(v1, "eng", 2))
    apps.delete_namespaced_deployment("eng", NS)  # its pods go too
    wait_for("no pods", lambda: pods_of(v1, "eng") == [])


def test_scale_down_removes_not_ready_pods_first_then_the_newest(
    kube_sim_factory: KubeSimFactory,
) -> None:
    sim = kube_sim_factory(speed=50)
    api = sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    apps.create_namespaced_deployment(NS, engine_deployment("eng", 2, cold_start_s=1))
    first = {p.metadata.name for p in wait_for("2 pods", lambda: ready_pods(v1, "eng", 2))}
    apps.patch_namespaced_deployment_scale("eng", NS, {"spec": {"replicas": 3}})
    third = wait_for("3 pods", lambda: ready_pods(v1, "eng", 3))
    (newest,) = {p.metadata.name for p in third} - first
    sick = sorted(first)[0]
    sim.set_ready(NS, sick, False)
    apps.patch_namespaced_deployment_scale("eng", NS, {"spec": {"replicas": 2}})
    left = {p.metadata.name for p in wait_for("2 pods", lambda: ready_pods_or_sick(v1, sick))}
    assert sick not in left and newest in left
    apps.patch_namespaced_deployment_scale("eng", NS, {"spec": {"replicas": 1}})
    (last,) = wait_for("1 pod", lambda: ready_pods(v1, "eng", 1))
    assert last.metadata.name != newest


def ready_pods_or_sick(v1: kubernetes.client.CoreV1Api, sick: str) -> list[Any] | None:
    pods = [p for p in pods_of(v1, "eng") if not p.metadata.deletion_timestamp]
    if len(pods) == 2 and all(pod_ready(p) for p in pods):
        return pods
    return None


def _stream_completion(url: str, max_tokens: int, started: threading.Event,
                       out: dict[str, Any]) -> None:  # fmt: skip
    body = {"model": "smollm2", "prompt": "hello", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}  # fmt: skip
    tokens = 0
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                tokens += 1
                started.set()
                if chunk["choices"][0].get("finish_reason"):
                    out["finish"] = chunk["choices"][0]["finish_reason"]
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        out["tokens"] = tokens
        started.set()


def test_a_deleted_pod_drains_its_in_flight_request(kube_sim: KubeSimProcess) -> None:
    api = kube_sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    apps.create_namespaced_deployment(NS, engine_deployment("eng", 1, cold_start_s=0.1))
    (pod,) = wait_for("1 ready pod", lambda: ready_pods(v1, "eng", 1))
    name = pod.metadata.name
    started, out = threading.Event(), {}
    # about 2 simulated (= wall, speed 1) seconds of decoding: still running after the DELETE
    t = threading.Thread(target=_stream_completion, args=(_engine_url(pod), 100, started, out))
    t.start()
    assert started.wait(20)
    deleted = v1.delete_namespaced_pod(name, NS)
    assert deleted.metadata.deletion_timestamp is not None
    draining = v1.read_namespaced_pod(name, NS)  # still there, not Ready, while it drains
    assert draining.metadata.deletion_timestamp is not None and not pod_ready(draining)
    t.join(30)
    assert out.get("finish") == "length" and out["tokens"] == 100, out
    wait_for("the pod gone", lambda: name not in {p.metadata.name for p in pods_of(v1, "eng")})
    (replacement,) = wait_for("a replacement", lambda: ready_pods(v1, "eng", 1))
    assert replacement.metadata.name != name


def test_drain_s_bounds_how_long_a_deleted_pod_serves(kube_sim: KubeSimProcess) -> None:
    api = kube_sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    dep = engine_deployment("eng", 1, cold_start_s=0.1, drain_s=0.2)
    apps.create_namespaced_deployment(NS, dep)
    (pod,) = wait_for("1 ready pod", lambda: ready_pods(v1, "eng", 1))
    started, out = threading.Event(), {}
    max_tokens = 1500  # about 30 simulated seconds of decoding, far beyond the 0.2 s drain
    t = threading.Thread(target=_stream_completion,
                         args=(_engine_url(pod), max_tokens, started, out))  # fmt: skip
    t.start()
    assert started.wait(20)
    apps.patch_namespaced_deployment_scale("eng", NS, {"spec": {"replicas": 0}})
    wait_for("the pod gone", lambda: pods_of(v1, "eng") == [])
    t.join(30)
    assert "finish" not in out and out["tokens"] < max_tokens, out
