"""The emulated Kubernetes API through the official ``kubernetes`` client (and raw HTTP where
the wire format itself is the point): discovery, namespaces, Pods list/watch, Leases."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from tests.kube.conftest import KubeSimFactory
from tests.kube.kubehelpers import NS, wait_for
from tests.kube.simproc import KubeSimProcess


def _status(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


def _pod(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}  # fmt: skip


def test_discovery_documents(kube_sim: KubeSimProcess) -> None:
    get = lambda path: httpx.get(kube_sim.url + path, timeout=10).json()  # noqa: E731
    assert get("/version")["major"] == "1"
    assert get("/api")["versions"] == ["v1"]
    groups = {g["name"]: g for g in get("/apis")["groups"]}
    assert groups["apps"]["preferredVersion"]["groupVersion"] == "apps/v1"
    assert "coordination.k8s.io" in groups
    core = {r["name"]: r for r in get("/api/v1")["resources"]}
    assert core["pods"]["kind"] == "Pod" and core["pods"]["namespaced"] is True
    assert {"list", "watch", "create", "delete"} <= set(core["pods"]["verbs"])
    assert core["namespaces"]["namespaced"] is False
    apps = {r["name"]: r for r in get("/apis/apps/v1")["resources"]}
    scale = apps["deployments/scale"]
    assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")
    assert set(scale["verbs"]) == {"get", "patch", "update"}
    leases = get("/apis/coordination.k8s.io/v1")["resources"]
    assert leases[0]["name"] == "leases" and "update" in leases[0]["verbs"]
    missing = httpx.get(kube_sim.url + "/apis/batch/v1/jobs", timeout=10)
    assert missing.status_code == 404 and missing.json()["kind"] == "Status"


def test_namespaces(kube_sim: KubeSimProcess) -> None:
    v1 = kubernetes.client.CoreV1Api(kube_sim.api())
    names = {n.metadata.name for n in v1.list_namespace().items}
    assert "default" in names
    v1.create_namespace({"metadata": {"name": "team-a"}})
    assert v1.read_namespace("team-a").status.phase == "Active"
    v1.create_namespaced_pod("team-a", _pod("p"))
    assert [p.metadata.name for p in v1.list_namespaced_pod("team-a").items] == ["p"]
    assert v1.list_namespaced_pod(NS).items == []
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_pod("nope", _pod("p"))
    assert err.value.status == 404 and _status(err.value)["reason"] == "NotFound"


def test_pod_selectors_errors_and_delete(kube_sim: KubeSimProcess) -> None:
    v1 = kubernetes.client.CoreV1Api(kube_sim.api())
    v1.create_namespaced_pod(NS, _pod("a", tier="a", canary="yes"))
    v1.create_namespaced_pod(NS, _pod("b", tier="b"))
    v1.create_namespaced_pod(NS, _pod("c", tier="c"))

    def names(selector: str) -> list[str]:
        return [p.metadata.name for p in v1.list_namespaced_pod(NS, label_selector=selector).items]

    assert names("tier in (a, b)") == ["a", "b"]
    assert names("tier notin (a)") == ["b", "c"]
    assert names("tier!=a") == ["b", "c"]
    assert names("canary") == ["a"]
    assert names("!canary") == ["b", "c"]
    assert names("tier=c") == ["c"]
    by_field = v1.list_namespaced_pod(NS, field_selector="metadata.name=b").items
    assert [p.metadata.name for p in by_field] == ["b"]
    with pytest.raises(ApiException) as err:
        v1.read_namespaced_pod("zzz", NS)
    status = _status(err.value)
    assert (status["kind"], status["apiVersion"], status["status"]) == ("Status", "v1", "Failure")
    assert (status["reason"], status["code"]) == ("NotFound", 404)
    assert status["message"] == 'pods "zzz" not found'
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_pod(NS, _pod("a"))
    assert err.value.status == 409 and _status(err.value)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as err:
        v1.list_namespaced_pod(NS, label_selector="tier in (a")
    assert err.value.status == 400
    v1.delete_namespaced_pod("b", NS)  # a plain pod (no engine) goes at once
    assert names("") == ["a", "c"]
    # set_ready forces the Ready condition (there is no kubelet for plain pods)
    kube_sim.set_ready(NS, "a", True)
    pod = v1.read_namespaced_pod("a", NS)
    ready = [c.status for c in pod.status.conditions if c.type == "Ready"]
    assert ready == ["True"] and pod.status.phase == "Running"


def test_watch_replays_from_resource_version_and_follows(kube_sim: KubeSimProcess) -> None:
    v1 = kubernetes.client.CoreV1Api(kube_sim.api())
    v1.create_namespaced_pod(NS, _pod("before", tier="a"))
    rv = v1.list_namespaced_pod(NS).metadata.resource_version
    v1.create_namespaced_pod(NS, _pod("p", tier="a"))
    kube_sim.set_ready(NS, "p", True)
    v1.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"tier": "b"}}})
    v1.delete_namespaced_pod("p", NS)

    w = kubernetes.watch.Watch()
    seen = [(e["type"], e["object"].metadata.name, int(e["object"].metadata.resource_version))
            for e in w.stream(v1.list_namespaced_pod, NS, resource_version=rv,
                              timeout_seconds=1)]  # fmt: skip
    assert [(t, n) for t, n, _ in seen] == [
        ("ADDED", "p"), ("MODIFIED", "p"), ("MODIFIED", "p"), ("DELETED", "p")
    ]  # fmt: skip
    rvs = [r for _, _, r in seen]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)
    # through a selector, an object that stops matching is DELETED for that watcher
    filtered = [(e["type"], e["object"].metadata.labels["tier"])
                for e in w.stream(v1.list_namespaced_pod, NS, resource_version=rv,
                                  label_selector="tier=a", timeout_seconds=1)]  # fmt: skip
    assert filtered == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "b")]

    # live: a watch opened now sees a pod created after it
    live: list[str] = []
    opened = threading.Event()

    def follow() -> None:
        watch = kubernetes.watch.Watch()
        opened.set()
        for e in watch.stream(v1.list_namespaced_pod, NS, timeout_seconds=10,
                              allow_watch_bookmarks=True):  # fmt: skip
            live.append(f"{e['type']} {e['object'].metadata.name}")
            if e["object"].metadata.name == "later":
                watch.stop()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    opened.wait(5)
    wait_for("the watch to open", lambda: kube_sim.state()["watches"] == 1)
    v1.create_namespaced_pod(NS, _pod("later"))
    t.join(10)
    assert not t.is_alive()
    assert live == ["ADDED before", "ADDED later"]  # rv unset: current objects first


def test_watch_from_a_compacted_resource_version_is_410(kube_sim_factory: KubeSimFactory) -> None:
    sim = kube_sim_factory(history=5)
    v1 = kubernetes.client.CoreV1Api(sim.api())
    old = v1.list_namespaced_pod(NS).metadata.resource_version
    for i in range(8):
        v1.create_namespaced_pod(NS, _pod(f"p{i}"))
    w = kubernetes.watch.Watch()
    with pytest.raises(ApiException) as err:
        list(w.stream(v1.list_namespaced_pod, NS, resource_version=old, timeout_seconds=2))
    assert err.value.status == 410
    # on the wire: 200, then one ERROR event whose object is a 410 Status
    raw = httpx.get(f"{sim.url}/api/v1/namespaces/{NS}/pods",
                    params={"watch": "1", "resourceVersion": old}, timeout=10)  # fmt: skip
    assert raw.status_code == 200
    lines = raw.text.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status" and event["object"]["code"] == 410
    # a fresh rv still watches fine
    fresh = v1.list_namespaced_pod(NS).metadata.resource_version
    assert list(w.stream(v1.list_namespaced_pod, NS, resource_version=fresh,
                         timeout_seconds=1)) == []  # fmt: skip


def test_lease_optimistic_concurrency(kube_sim: KubeSimProcess) -> None:
    co = kubernetes.client.CoordinationV1Api(kube_sim.api())
    spec = {"holderIdentity": "gw-1", "leaseDurationSeconds": 10,
            "acquireTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 0}  # fmt: skip
    body = {"metadata": {"name": "leader"}, "spec": spec}
    created = co.create_namespaced_lease(NS, body)
    assert created.spec.holder_identity == "gw-1"
    with pytest.raises(ApiException) as err:
        co.create_namespaced_lease(NS, body)
    assert err.value.status == 409 and _status(err.value)["reason"] == "AlreadyExists"

    mine = co.read_namespaced_lease("leader", NS)
    theirs = co.read_namespaced_lease("leader", NS)
    mine.spec.holder_identity = "gw-2"
    renewed = co.replace_namespaced_lease("leader", NS, mine)
    assert renewed.spec.holder_identity == "gw-2"
    assert int(renewed.metadata.resource_version) > int(theirs.metadata.resource_version)
    theirs.spec.holder_identity = "gw-3"
    with pytest.raises(ApiException) as err:
        co.replace_namespaced_lease("leader", NS, theirs)  # stale resourceVersion
    status = _status(err.value)
    assert (err.value.status, status["reason"], status["kind"]) == (409, "Conflict", "Status")
    assert "the object has been modified" in status["message"]
    stale = {"metadata": {"resourceVersion": theirs.metadata.resource_version},
             "spec": {"holderIdentity": "gw-3"}}  # fmt: skip
    with pytest.raises(ApiException) as err:
        co.patch_namespaced_lease("leader", NS, stale)
    assert err.value.status == 409
    patched = co.patch_namespaced_lease("leader", NS, {"spec": {"leaseTransitions": 1}})
    assert patched.spec.holder_identity == "gw-2" and patched.spec.lease_transitions == 1
    assert [x.metadata.name for x in co.list_namespaced_lease(NS).items] == ["leader"]
    co.delete_namespaced_lease("leader", NS)
    with pytest.raises(ApiException) as err:
        co.read_namespaced_lease("leader", NS)
    assert err.value.status == 404


def test_deployment_create_get_list_patch_replace_delete(kube_sim: KubeSimProcess) -> None:
    api = kube_sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    template = {"metadata": {"labels": {"app": "plain"}},
                "spec": {"containers": [{"name": "c", "image": "x"}]}}  # fmt: skip
    body = {"metadata": {"name": "plain"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "plain"}},
                     "template": template}}  # fmt: skip
    dep = apps.create_namespaced_deployment(NS, body)
    assert dep.metadata.generation == 1 and dep.spec.replicas == 1
    with pytest.raises(ApiException) as err:
        apps.create_namespaced_deployment(NS, body)
    assert err.value.status == 409

    def plain_pods() -> list[str]:
        return [
            p.metadata.name for p in v1.list_namespaced_pod(NS, label_selector="app=plain").items
        ]

    wait_for("1 plain pod", lambda: len(plain_pods()) == 1)
    patched = apps.patch_namespaced_deployment("plain", NS, {"spec": {"replicas": 2}})
    assert patched.spec.replicas == 2 and patched.metadata.generation == 2
    wait_for("2 plain pods", lambda: len(plain_pods()) == 2)
    current = apps.read_namespaced_deployment("plain", NS)
    assert current.status.replicas == 2 and current.status.ready_replicas == 0
    current.spec.replicas = 0
    current.metadata.labels = {"team": "a"}
    replaced = apps.replace_namespaced_deployment("plain", NS, current)
    assert replaced.metadata.labels == {"team": "a"} and replaced.metadata.generation == 3
    wait_for("no plain pods", lambda: plain_pods() == [])  # plain pods go at once
    assert [d.metadata.name for d in apps.list_deployment_for_all_namespaces().items] == ["plain"]
    assert apps.list_namespaced_deployment(NS, label_selector="team=a").items[0].spec.replicas == 0
    status = apps.delete_namespaced_deployment("plain", NS)  # v37 types it as a plain object
    assert (status["kind"], status["status"]) == ("Status", "Success")
    with pytest.raises(ApiException) as err:
        apps.read_namespaced_deployment("plain", NS)
    assert err.value.status == 404
