"""The real ``kubectl`` (Debian's kubectl 1.20 via scripts/kubectl.sh) against the emulator:
discovery, Table and JSON answers, the scale subresource and DELETE on the wire it expects."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import kubernetes

from tests.kube.conftest import KubeSimFactory
from tests.kube.kubehelpers import NS, engine_deployment, ready_pods, wait_for
from tests.kube.simproc import KubeSimProcess

REPO = Path(__file__).resolve().parents[2]
KUBECTL = str(REPO / "scripts" / "kubectl.sh")


def _which() -> str:
    out = subprocess.run([KUBECTL, "--which"], capture_output=True, text=True, timeout=600,
                         check=True).stdout.strip()  # fmt: skip
    version = subprocess.run([KUBECTL, "version", "--client"], capture_output=True, text=True,
                             timeout=60).stdout.strip()  # fmt: skip
    line = f"kubectl: {out} ({version.splitlines()[0] if version else 'version unknown'})"
    print(line)
    if not out.startswith("apt "):
        warnings.warn(f"kubectl 1.20 unavailable, using the PATH kubectl: {line}", stacklevel=1)
    return out


def _kubectl(sim: KubeSimProcess, *args: str) -> str:
    argv = [KUBECTL, "--kubeconfig", str(sim.kubeconfig),
            "--cache-dir", str(sim.workdir / "kubectl-cache"), *args]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"kubectl {' '.join(args)}: {res.stderr}"
    return res.stdout


def test_kubectl_gets_pods_deployments_and_leases(kube_sim_factory: KubeSimFactory) -> None:
    _which()
    sim = kube_sim_factory(speed=50)
    api = sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    co = kubernetes.client.CoordinationV1Api(api)
    apps.create_namespaced_deployment(NS, engine_deployment("eng", 2, cold_start_s=1))
    co.create_namespaced_lease(NS, {"metadata": {"name": "switchyard-autoscaler"},
                                    "spec": {"holderIdentity": "gw-1"}})  # fmt: skip
    plain = {"metadata": {"name": "plain"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    v1.create_namespaced_pod(NS, plain)
    pods = {p.metadata.name for p in wait_for("2 ready", lambda: ready_pods(v1, "eng", 2))}

    table = _kubectl(sim, "get", "pods,deployments,leases")
    for name in [*pods, "plain"]:
        assert f"pod/{name}" in table
    assert "deployment.apps/eng" in table
    assert "lease.coordination.k8s.io/switchyard-autoscaler" in table
    dep_line = next(line for line in table.splitlines() if "deployment.apps/eng" in line)
    assert dep_line.split()[1] == "2/2"  # READY, a server-side Table column
    assert "gw-1" in table  # the lease's HOLDER column

    listing = json.loads(_kubectl(sim, "get", "pods,deployments,leases", "-o", "json"))
    kinds = {(item["kind"], item["metadata"]["name"]) for item in listing["items"]}
    assert {("Pod", n) for n in pods} | {("Deployment", "eng")} <= kinds
    assert ("Lease", "switchyard-autoscaler") in kinds

    _kubectl(sim, "scale", "deployment/eng", "--replicas=1")
    wait_for("1 ready", lambda: ready_pods(v1, "eng", 1))
    assert apps.read_namespaced_deployment("eng", NS).spec.replicas == 1
    _kubectl(sim, "delete", "pod", "plain")
    assert "plain" not in _kubectl(sim, "get", "pods", "-o", "name")
