"""``switchyard kube-sim``: the kubeconfig it writes, a clean stop on SIGTERM (engines too)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import kubernetes
import pytest

from tests.kube.conftest import KubeSimFactory
from tests.kube.kubehelpers import NS, engine_deployment, ready_pods, wait_for
from tests.kube.simproc import SWITCHYARD


def test_kubeconfig_and_clean_shutdown_on_sigterm(kube_sim_factory: KubeSimFactory) -> None:
    sim = kube_sim_factory(speed=50)
    config = json.loads(sim.kubeconfig.read_text())
    assert config["current-context"] == "kube-sim"
    assert config["clusters"][0]["cluster"]["server"] == sim.url
    assert config["contexts"][0]["context"]["namespace"] == "default"
    api = sim.api()
    v1, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    apps.create_namespaced_deployment(NS, engine_deployment("eng", 2, cold_start_s=1))
    pods = wait_for("2 ready", lambda: ready_pods(v1, "eng", 2))
    urls = [f"http://127.0.0.1:{p.metadata.annotations['switchyard.io/port']}" for p in pods]
    for url in urls:
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert sim.terminate() == 0
    for url in [*urls, sim.url]:  # every engine stopped with it
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)


def test_bad_flags_exit_with_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [SWITCHYARD, "kube-sim", "--port", "0", "--kubeconfig", str(tmp_path / "kc"),
         "--speed", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2 and "speed must be > 0" in res.stderr
    assert not (tmp_path / "kc").exists()
