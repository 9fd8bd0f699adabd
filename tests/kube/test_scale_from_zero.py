"""Scale from zero, end to end: a gateway with Kubernetes discovery and the embedded
autoscaler (``proactive``, ``min_replicas: 0``) in front of an engine Deployment at 0 replicas
on the emulated API. The gateway stays ready with no engine (``/ready`` 200, so a
readinessProbe keeps it in the Service), answers each request 503 ``no_healthy_endpoint``
with ``retry-after`` while nothing is ready, counts them as demand, patches the Deployment to
one replica, and serves once the pod is Ready (docs/autoscaling.md, scaling from zero).

Time is compressed: the emulator runs ``SPEED`` times faster than the wall clock (cold start,
decoding) and the autoscaler's ``time_scale`` matches it, so its 1 s ticks and windows are
simulated seconds. Every wait is bounded; nothing asserts a duration."""

from __future__ import annotations

import re
import time
from typing import Any, cast

import httpx
import openai
from kubernetes import client

from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.servers import ServerThread
from tests.kube.conftest import KubeSimFactory
from tests.kube.kubehelpers import NS, engine_deployment

SPEED = 10.0
WAIT_S = 40.0  # wall seconds; the loop below takes a few with SPEED 10


def _settings(kubeconfig: Any) -> Settings:
    return Settings.model_validate({
        "discovery": {"kind": "kubernetes", "selector": "app=engine", "kubeconfig": kubeconfig,
                      "request_timeout_s": 2.0},
        "health": {"interval_s": 0.2, "timeout_s": 1.0, "fail_threshold": 2,
                   "success_threshold": 1},
        "server": {"access_log": False},
        "autoscaling": {
            "enabled": True, "policy": "proactive",
            # small windows and a cold start's lead in simulated seconds (the engine's is 3)
            "policy_settings": {"lead_time_s": 3.0, "short_window_s": 5, "long_window_s": 10,
                                "trend_window_s": 10},
            "target": {"name": "engine"}, "kubeconfig": kubeconfig,
            "min_replicas": 0, "max_replicas": 2, "interval_s": 1.0, "time_scale": SPEED,
            "leader_election": {"enabled": False},
        },
    })  # fmt: skip


def _replicas(api: client.AppsV1Api) -> int:
    scale = api.read_namespaced_deployment_scale("engine", NS)
    assert scale.spec is not None and scale.spec.replicas is not None
    return scale.spec.replicas


def test_requests_scale_the_engines_up_from_zero(kube_sim_factory: KubeSimFactory) -> None:
    sim = kube_sim_factory(speed=SPEED)
    apps = client.AppsV1Api(sim.api())
    apps.create_namespaced_deployment(
        NS, cast(Any, engine_deployment("engine", 0, cold_start_s=3.0))
    )
    with ServerThread(create_app(_settings(sim.kubeconfig))) as gateway:
        # Zero engines: the gateway is ready all the same (readiness keeps it in the Service).
        ready = httpx.get(f"{gateway.url}/ready", timeout=5)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert (body["status"], body["healthy_engines"], body["engines"]) == ("ready", 0, [])
        assert body["discovery"] == {"listed": True, "engines": 0}
        assert _replicas(apps) == 0

        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        refused: list[openai.APIStatusError] = []
        answer = None
        deadline = time.monotonic() + WAIT_S
        while answer is None and time.monotonic() < deadline:
            try:
                answer = sdk.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": "hello"}],
                    max_tokens=8,
                )  # fmt: skip
            except openai.APIStatusError as exc:
                refused.append(exc)
                time.sleep(0.05)
        assert answer is not None, (
            f"no request succeeded; {len(refused)} refused, replicas {_replicas(apps)}"
        )
        assert answer.choices[0].message.content

        # Until a pod was Ready, every request got the OpenAI envelope and a retry-after.
        assert refused, "an engine was ready before any request: nothing was scaled"
        for exc in refused:
            assert (exc.status_code, exc.code) == (503, "no_healthy_endpoint"), exc
            assert exc.response.headers["retry-after"] == "1"
        assert _replicas(apps) >= 1
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
        assert 'switchyard_autoscaler_decisions_total{policy="proactive",reason="scale_up"}' in (
            metrics
        )
        patches = re.search(r"^switchyard_autoscaler_scale_patches_total (\S+)$", metrics, re.M)
        assert patches is not None and float(patches.group(1)) >= 1
        after = httpx.get(f"{gateway.url}/ready", timeout=5).json()
        assert after["healthy_engines"] == 1 and after["discovery"]["engines"] == 1
        sdk.close()
