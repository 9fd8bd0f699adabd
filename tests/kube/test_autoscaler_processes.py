"""The autoscaler as it runs: ``switchyard autoscaler`` as a subprocess, embedded in a
gateway that discovers its engine pods, and the standalone source scraping real enginesim
pods -- all against the emulated API."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
import yaml
from kubernetes import client

from autoscale.clock import WallClock
from autoscale.kube import ScaleTarget
from autoscale.sources import PodSource, TargetReader
from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.servers import ServerThread, wait_until
from tests.kube.autoscalehelpers import NS, kube_api, plain_deployment
from tests.kube.kubehelpers import engine_deployment, ready_pods, wait_for
from tests.kube.simproc import KubeSimProcess
from tests.processes import die_with_parent, reap

SWITCHYARD = str(Path(sys.executable).with_name("switchyard"))
_STARTED = re.compile(r"metrics on (http://127\.0\.0\.1:\d+/metrics)")
ELECTION = {"lease_duration_s": 3.0, "renew_deadline_s": 2.0, "retry_period_s": 0.5}


def create(sim: KubeSimProcess, body: dict[str, Any]) -> None:
    """A Deployment from its wire JSON (the typed client takes the dict as it is)."""
    client.AppsV1Api(sim.api()).create_namespaced_deployment(NS, cast(Any, body))


def lease_holder(sim: KubeSimProcess) -> str | None:
    lease = client.CoordinationV1Api(sim.api()).read_namespaced_lease("switchyard-autoscaler", NS)
    assert lease.spec is not None
    return lease.spec.holder_identity


def replicas(sim: KubeSimProcess, name: str) -> int:
    scale = client.AppsV1Api(sim.api()).read_namespaced_deployment_scale(name, NS)
    assert scale.spec is not None and scale.spec.replicas is not None
    return scale.spec.replicas


def test_standalone_autoscaler_scales_serves_metrics_and_releases(
    kube_sim: KubeSimProcess, tmp_path: Path
) -> None:
    create(kube_sim, plain_deployment("web", 1))
    config = tmp_path / "switchyard.yaml"
    config.write_text(yaml.safe_dump({"autoscaling": {
        "policy": "static", "policy_settings": {"replicas": 3},
        "target": {"name": "web"}, "kubeconfig": str(kube_sim.kubeconfig),
        "interval_s": 0.2, "max_replicas": 4,
        "leader_election": {**ELECTION, "identity": "standalone-1"},
    }}))  # fmt: skip
    out = tmp_path / "stdout"
    with out.open("wb") as fout:
        proc = subprocess.Popen(  # noqa: S603
            [SWITCHYARD, "autoscaler", "--config", str(config), "--metrics-port", "0"],
            stdout=fout, stderr=subprocess.PIPE, preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        url = wait_for("the metrics line", lambda: _STARTED.search(out.read_text()))
        metrics_url = url.group(1)
        wait_for("the scale patch", lambda: replicas(kube_sim, "web") == 3)
        assert lease_holder(kube_sim) == "standalone-1"

        def exported() -> bool:
            text = httpx.get(metrics_url, timeout=5).text
            return all(line in text for line in (
                "switchyard_autoscaler_leader_ratio 1.0",
                "switchyard_autoscaler_desired_replicas 3.0",
                "switchyard_autoscaler_current_replicas 3.0",
                'switchyard_autoscaler_decisions_total{policy="static",reason="static"}',
                "switchyard_autoscaler_scale_patches_total 1.0",
            ))  # fmt: skip

        wait_for("the metrics", exported)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert lease_holder(kube_sim) == ""  # released on the way out
        assert replicas(kube_sim, "web") == 3
    finally:
        reap(proc)


def test_a_bad_standalone_config_exits_2_and_no_kubeconfig_1(tmp_path: Path) -> None:
    config = tmp_path / "switchyard.yaml"
    config.write_text(yaml.safe_dump({"autoscaling": {"policy": "static"}}))
    done = subprocess.run(  # noqa: S603
        [SWITCHYARD, "autoscaler", "--config", str(config)],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and b"target.name is required" in done.stderr
    config.write_text(yaml.safe_dump({"autoscaling": {
        "policy": "proactive", "target": {"name": "web"}, "min_replicas": 0,
    }}))  # fmt: skip
    done = subprocess.run(  # noqa: S603
        [SWITCHYARD, "autoscaler", "--config", str(config)],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and b"min_replicas 0 with the standalone" in done.stderr
    config.write_text(yaml.safe_dump({"autoscaling": {
        "policy": "static", "target": {"name": "web"}, "kubeconfig": str(tmp_path / "none"),
    }}))  # fmt: skip
    done = subprocess.run(  # noqa: S603
        [SWITCHYARD, "autoscaler", "--config", str(config), "--metrics-port", "0"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and b"no usable Kubernetes configuration" in done.stderr


def test_the_gateway_embeds_the_autoscaler(kube_sim: KubeSimProcess) -> None:
    create(kube_sim, engine_deployment("engine", 1, cold_start_s=0.3))
    settings = Settings.model_validate({
        "discovery": {"kind": "kubernetes", "selector": "app=engine",
                      "kubeconfig": kube_sim.kubeconfig, "request_timeout_s": 2.0},
        "health": {"interval_s": 0.2, "timeout_s": 1.0, "fail_threshold": 2,
                   "success_threshold": 1},
        "server": {"access_log": False},
        "autoscaling": {
            "enabled": True, "policy": "static", "policy_settings": {"replicas": 2},
            "target": {"name": "engine"}, "kubeconfig": kube_sim.kubeconfig,
            "interval_s": 0.2, "model": "smollm2",
            "leader_election": {**ELECTION, "identity": "gateway-0"},
        },
    })  # fmt: skip
    with ServerThread(create_app(settings)) as gateway:
        core = client.CoreV1Api(kube_sim.api())
        wait_for("two ready engine pods", lambda: ready_pods(core, "engine", 2), 30)
        assert lease_holder(kube_sim) == "gateway-0"

        def discovered() -> bool:
            engines = httpx.get(f"{gateway.url}/admin/engines", timeout=5).json()["engines"]
            return len(engines) == 2

        assert wait_until(discovered, timeout=30), "the gateway never saw both pods"
        text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
        assert "switchyard_autoscaler_leader_ratio 1.0" in text
        assert "switchyard_autoscaler_desired_replicas 2.0" in text
        assert 'switchyard_autoscaler_errors_total{kind="api"} 0.0' in text
    assert lease_holder(kube_sim) == ""  # the gateway's shutdown released it
    assert replicas(kube_sim, "engine") == 2


@pytest.mark.anyio
async def test_the_standalone_source_scrapes_engine_pods(kube_sim: KubeSimProcess) -> None:
    create(kube_sim, engine_deployment("engine", 1, cold_start_s=0.3))
    core = client.CoreV1Api(kube_sim.api())
    await anyio.to_thread.run_sync(
        lambda: wait_for("a ready pod", lambda: ready_pods(core, "engine", 1), 30)
    )
    api = kube_api(kube_sim)
    errors: list[str] = []
    try:
        async with httpx.AsyncClient(timeout=2.0) as http:
            source = PodSource(reader=TargetReader(api, ScaleTarget("engine")), http=http,
                               clock=WallClock(), on_error=errors.append)  # fmt: skip
            obs = await source.observe()
    finally:
        api.close()
    assert (obs.current, obs.ready, obs.stale, errors) == (1, 1, False, [])
    (engine,) = obs.engines
    assert engine.ready and engine.kv_usage is not None  # the engine's own vllm: gauges
    assert (engine.running, engine.waiting) == (0.0, 0.0)
