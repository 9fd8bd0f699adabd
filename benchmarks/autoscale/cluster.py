"""The processes of one autoscaling run: the emulated cluster and the gateway in front of it.

* :class:`KubeSim` -- ``switchyard kube-sim --speed S`` (pods backed by enginesim engines, all
  in that one process) and the engine Deployment (``sim.switchyard.io/*`` template
  annotations: profile, model, cold start, drain), created and scaled with the official
  ``kubernetes`` client through the kubeconfig the emulator writes.
* :class:`Gateway` -- ``switchyard serve --config`` with Kubernetes discovery of that
  Deployment's pods and, for contenders that run embedded, the ``autoscaling:`` section.
* :class:`ReplicaRecorder` -- polls the emulator's ``/_sim/state`` every ``poll_s`` wall
  seconds and keeps :class:`~benchmarks.autoscale.metrics.ReplicaSample`\\ s in simulated time.

Every process is started with ``die_with_parent`` (PR_SET_PDEATHSIG: the kernel kills it if
the benchmark dies) in its own session, and stopped by its PID (SIGTERM, then SIGKILL), never by
name; logs go to files under the run's directory. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import kubernetes
import yaml

from benchmarks.autoscale.metrics import ReplicaSample
from benchmarks.ports import free_port
from benchmarks.routing.launch import LaunchError, Proc, die_with_parent, spawn

__all__ = ["DeploymentSpec", "Gateway", "KubeSim", "LaunchError", "ReplicaRecorder"]

SWITCHYARD = str(Path(sys.executable).with_name("switchyard"))
_READY = re.compile(rb"kube-sim ready (http://127\.0\.0\.1:\d+)")
APP_LABEL = "switchyard-bench"


class _Proc(Proc):
    """:class:`~benchmarks.routing.launch.Proc` measuring the process alone."""

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process so far (0 once reaped)."""
        try:
            with open(f"/proc/{self.popen.pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, n: int = 30) -> str:
        return super().tail(n)


def _spawn(name: str, argv: list[str], log_dir: Path) -> _Proc:
    proc = spawn(name, argv, log_dir, preexec_fn=die_with_parent)
    return _Proc(name=proc.name, popen=proc.popen, log=proc.log)


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """The engine Deployment every contender scales."""

    name: str = "llama"
    namespace: str = "default"
    profile: str = "llama3-8b-a100-bench"
    model: str = "llama3-8b"
    cold_start_s: float = 120.0
    drain_s: float = 30.0

    def manifest(self, replicas: int) -> dict[str, Any]:
        labels = {"app": APP_LABEL, "switchyard.io/model": self.model}
        annotations = {
            "sim.switchyard.io/profile": self.profile,
            "sim.switchyard.io/model": self.model,
            "sim.switchyard.io/cold-start-s": str(self.cold_start_s),
            "sim.switchyard.io/drain-s": str(self.drain_s),
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": APP_LABEL}},
                "template": {
                    "metadata": {"labels": labels, "annotations": annotations},
                    "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
                },
            },
        }

    @property
    def selector(self) -> str:
        return f"app={APP_LABEL}"


class KubeSim:
    """``switchyard kube-sim`` plus the engine Deployment; ``with KubeSim(...) as sim:``."""

    def __init__(self, *, speed: float, log_dir: Path, seed: int = 0) -> None:
        self.speed = speed
        self.log_dir = log_dir
        self.seed = seed
        self.kubeconfig = log_dir / "kubeconfig"
        self.url = ""
        self.proc: _Proc | None = None
        self._api: kubernetes.client.ApiClient | None = None

    def __enter__(self) -> KubeSim:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> KubeSim:
        argv = [SWITCHYARD, "kube-sim", "--port", "0", "--kubeconfig", str(self.kubeconfig),
                "--speed", str(self.speed), "--seed", str(self.seed)]  # fmt: skip
        self.proc = _spawn("kube-sim", argv, self.log_dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = _READY.search(self.proc.log.read_bytes())
            if match and self.kubeconfig.exists():
                self.url = match.group(1).decode()
                return self
            if not self.proc.alive():
                break
            time.sleep(0.05)
        raise LaunchError(f"kube-sim did not start:\n{self.proc.tail()}")

    def stop(self) -> None:
        if self._api is not None:
            self._api.close()  # type: ignore[no-untyped-call]
            self._api = None
        if self.proc is not None:
            self.proc.stop()

    def api(self) -> kubernetes.client.ApiClient:
        if self._api is None:
            self._api = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=str(self.kubeconfig)
            )
        return self._api

    def create(self, dep: DeploymentSpec, replicas: int) -> None:
        apps = kubernetes.client.AppsV1Api(self.api())
        apps.create_namespaced_deployment(dep.namespace, dep.manifest(replicas))  # type: ignore[arg-type]

    def scale(self, dep: DeploymentSpec, replicas: int) -> None:
        apps = kubernetes.client.AppsV1Api(self.api())
        apps.patch_namespaced_deployment_scale(
            dep.name, dep.namespace, {"spec": {"replicas": replicas}}
        )

    def state(self) -> dict[str, Any]:
        resp = httpx.get(f"{self.url}/_sim/state", timeout=10.0)
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def wait_settled(self, dep: DeploymentSpec, replicas: int, *, timeout_s: float) -> None:
        """Until exactly ``replicas`` pods exist, all Ready, none draining (bounded)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sample = sample_of(self.state(), dep, 0.0)
            if sample.ready == replicas and sample.pods == replicas and sample.desired == replicas:
                return
            if self.proc is not None and not self.proc.alive():
                raise LaunchError(f"kube-sim exited:\n{self.proc.tail()}")
            time.sleep(0.2)
        raise LaunchError(f"{dep.name}: not {replicas} ready pods after {timeout_s:g}s")


def sample_of(state: dict[str, Any], dep: DeploymentSpec, t: float) -> ReplicaSample:
    """The Deployment's replicas in an emulator ``/_sim/state`` answer."""
    desired = 0
    for d in state.get("deployments", []):
        if d["name"] == dep.name and d["namespace"] == dep.namespace:
            desired = int(d["replicas"])
    pods = [p for p in state.get("pods", []) if p["namespace"] == dep.namespace
            and str(p["name"]).startswith(f"{dep.name}-")]  # fmt: skip
    ready = sum(1 for p in pods if p["ready"] and not p["deleting"])
    return ReplicaSample(t=t, desired=desired, ready=ready, pods=len(pods))


@dataclass(slots=True)
class ReplicaRecorder:
    """Polls ``/_sim/state`` every ``poll_s`` wall seconds; ``samples`` in simulated seconds
    since ``t0`` (``time.perf_counter()``)."""

    url: str
    dep: DeploymentSpec
    speed: float
    t0: float
    poll_s: float = 0.1
    samples: list[ReplicaSample] = field(default_factory=list)
    errors: int = 0
    rtts_s: list[float] = field(default_factory=list)
    """Wall seconds per poll: the emulator's responsiveness (a starved host shows here)."""

    async def run(self, duration_s: float) -> None:
        """Poll until ``duration_s`` wall seconds after ``t0`` (bounded by construction)."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            while (now := time.perf_counter()) - self.t0 < duration_s:
                try:
                    resp = await client.get(f"{self.url}/_sim/state")
                    resp.raise_for_status()
                    self.rtts_s.append(time.perf_counter() - now)
                    t = (now - self.t0) * self.speed
                    self.samples.append(sample_of(resp.json(), self.dep, t))
                except (httpx.HTTPError, ValueError, KeyError):
                    self.errors += 1
                await anyio.sleep(self.poll_s)


class Gateway:
    """``switchyard serve --config`` in front of the Deployment's pods (Kubernetes discovery);
    ``autoscaling`` is the section to embed (None: no autoscaler in the gateway)."""

    def __init__(
        self,
        *,
        sim: KubeSim,
        dep: DeploymentSpec,
        log_dir: Path,
        name: str,
        autoscaling: dict[str, Any] | None = None,
        routing: dict[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": self.port, "access_log": False},
            "routing": {"policy": "least-request", "scrape_interval_s": 0.2, **(routing or {})},
            "discovery": {
                "kind": "kubernetes",
                "namespace": dep.namespace,
                "selector": dep.selector,
                "kubeconfig": str(sim.kubeconfig),
            },
            # Slow-engine avoidance off: its timers are wall seconds (S x longer in simulated
            # time) and with prompts varying 2x its TTFT-EWMA test flags engines on the mix
            # alone, piling a clump of arrivals onto the others (seen at S = 8).
            "outliers": {"slow_factor": 1e6},
            "log_level": "WARNING",
        }
        if autoscaling is not None:
            self.config["autoscaling"] = autoscaling
        self.log_dir = log_dir
        self.name = name
        self.proc: _Proc | None = None

    def start(self, *, engines: int, timeout_s: float = 60.0) -> Gateway:
        """Start and wait until ``/health`` answers and ``engines`` engines are routable."""
        path = self.log_dir / f"{self.name}.yaml"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config))
        self.proc = _spawn(self.name, [SWITCHYARD, "serve", "--config", str(path)], self.log_dir)
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if not self.proc.alive():
                    raise LaunchError(f"{self.name} exited:\n{self.proc.tail()}")
                try:
                    if self.engines(client) >= engines:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise LaunchError(f"{self.name} not ready after {timeout_s:g}s")

    def engines(self, client: httpx.Client) -> int:
        """Healthy engines the gateway routes to (``/ready``)."""
        resp = client.get(f"{self.url}/ready")
        return int(resp.json().get("healthy_engines", 0))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def cpu_s(self) -> float:
        return self.proc.cpu_s() if self.proc is not None else 0.0
