"""Helpers for tests against the emulated API: engine Deployments, bounded polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import kubernetes

T = TypeVar("T")
NS = "default"
WAIT_S = 20.0


def engine_deployment(
    name: str,
    replicas: int,
    *,
    cold_start_s: float = 0.5,
    drain_s: float | None = None,
    model: str = "smollm2",
) -> dict[str, Any]:
    """A Deployment whose pods run cpu-smollm2 engines."""
    annotations = {
        "sim.switchyard.io/profile": "cpu-smollm2",
        "sim.switchyard.io/model": model,
        "sim.switchyard.io/cold-start-s": str(cold_start_s),
    }
    if drain_s is not None:
        annotations["sim.switchyard.io/drain-s"] = str(drain_s)
    labels = {"app": name, "switchyard.io/model": model}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
            },
        },
    }


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = WAIT_S) -> T:
    """Poll ``probe`` until it returns something truthy (bounded); that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def pods_of(v1: kubernetes.client.CoreV1Api, app: str) -> list[Any]:
    return list(v1.list_namespaced_pod(NS, label_selector=f"app={app}").items)


def ready_pods(v1: kubernetes.client.CoreV1Api, app: str, n: int) -> list[Any] | None:
    """The pods of ``app`` when exactly ``n`` exist, none deleting, all Ready; else None."""
    pods = pods_of(v1, app)
    ok = len(pods) == n and all(pod_ready(p) and not p.metadata.deletion_timestamp for p in pods)
    return pods if ok else None
