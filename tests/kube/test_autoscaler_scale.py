"""The autoscaler's scale client and decision loop against the emulated API (real client).

Scale patches land on a Deployment (checked through the official typed client too); API
faults (500s, slow answers, 409 on writes) make the loop hold -- no patch, the error counted,
``holding`` 1 -- and never produce a scale other than what the policy and limits ask for.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from autoscale.kube import KubeError, KubeNotFound, ScaleClient, ScaleTarget, list_pods
from tests.kube.autoscalehelpers import (
    NS,
    Wants,
    controller,
    create_deployment,
    kube_api,
    replicas_of,
)
from tests.kube.simproc import KubeSimProcess

pytestmark = pytest.mark.anyio


async def test_scale_patches_land_on_the_deployment(kube_sim: KubeSimProcess) -> None:
    api = kube_api(kube_sim)
    try:
        await create_deployment(api, "web", 1)
        scales = ScaleClient(api, ScaleTarget("web"))
        scale = await scales.get()
        assert (scale.spec_replicas, scale.selector) == (1, "app=web")
        patched = await scales.patch_replicas(4)
        assert patched.spec_replicas == 4
        typed = client.AppsV1Api(kube_sim.api()).read_namespaced_deployment("web", NS)
        assert typed.spec is not None and typed.spec.replicas == 4
        pods: list[object] = []

        async def refresh() -> None:
            pods[:] = await list_pods(api, NS, "app=web")

        await refresh()
        for _ in range(100):
            if len(pods) == 4:
                break
            await refresh()
        assert len(pods) == 4  # the emulated Deployment controller followed the patch
        with pytest.raises(KubeNotFound):
            await ScaleClient(api, ScaleTarget("nope")).get()
    finally:
        api.close()


def test_a_missing_kubeconfig_is_a_kube_error(tmp_path: Path) -> None:
    from autoscale.kube import KubeApi

    with pytest.raises(KubeError):
        KubeApi.from_kubeconfig(tmp_path / "missing")


def _sample(registry: object, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return 0.0 if value is None else float(value)


async def test_api_faults_hold_and_never_scale_wrong(kube_sim: KubeSimProcess) -> None:
    api = kube_api(kube_sim, timeout_s=0.5)
    try:
        await create_deployment(api, "web", 1)
        policy = Wants(3)
        ctl, registry = controller(api, "web", policy)
        seen: set[int] = set()

        # every API answer a 500: hold, count, back off
        kube_sim.faults(error_rate=1.0)
        for n in range(1, 4):
            tick = await ctl.tick()
            assert tick.held and tick.error == "api" and not tick.patched
            assert _sample(registry, "switchyard_autoscaler_errors_total", kind="api") == n
        assert _sample(registry, "switchyard_autoscaler_holding_ratio") == 1
        assert ctl.next_delay() > ctl.interval_s  # backing off
        assert _sample(registry, "switchyard_autoscaler_decisions_total",
                       policy="wants", reason="error_api") == 3  # fmt: skip

        # answers slower than the call's bound: hold
        kube_sim.faults(error_rate=0.0, latency_s=1.5)
        tick = await ctl.tick()
        assert tick.held and tick.error == "api"
        kube_sim.faults(latency_s=0.0)
        seen.add(await replicas_of(api, "web"))

        # the next write answers 409: the patch fails, hold; nothing changed
        kube_sim.faults(conflicts=1)
        tick = await ctl.tick()
        assert tick.held and tick.error == "api" and not tick.patched
        seen.add(await replicas_of(api, "web"))
        assert seen == {1}

        # faults gone: the one patch the policy asked for, then nothing
        tick = await ctl.tick()
        assert tick.patched and not tick.held and ctl.failures == 0
        assert await replicas_of(api, "web") == 3
        assert _sample(registry, "switchyard_autoscaler_holding_ratio") == 0
        assert _sample(registry, "switchyard_autoscaler_scale_patches_total") == 1
        tick = await ctl.tick()
        assert not tick.patched
        assert _sample(registry, "switchyard_autoscaler_desired_replicas") == 3
        assert _sample(registry, "switchyard_autoscaler_current_replicas") == 3

        # beyond max_replicas: clamped, and the limit counted
        policy.n = 50
        await ctl.tick()
        assert await replicas_of(api, "web") == 5
        assert _sample(registry, "switchyard_autoscaler_limited_decisions_total", limit="max") >= 1
        assert _sample(registry, "switchyard_autoscaler_recommended_replicas") == 50
        assert _sample(registry, "switchyard_autoscaler_leader_ratio") == 1  # no elector: leads
    finally:
        kube_sim.faults(error_rate=0.0, latency_s=0.0, conflicts=0)
        api.close()


async def test_flaky_api_never_moves_the_target_off_the_policy(kube_sim: KubeSimProcess) -> None:
    """Half the answers 500: whatever fails, every value the target takes is one the
    policy asked for (clamped), and the loop gets there."""
    api = kube_api(kube_sim, timeout_s=0.5)
    try:
        await create_deployment(api, "web", 1)
        policy = Wants(4)
        ctl, registry = controller(api, "web", policy)
        kube_sim.faults(error_rate=0.5)
        values: set[int] = set()
        for _ in range(30):
            await ctl.tick()
            kube_sim.faults(error_rate=0.0)
            values.add(await replicas_of(api, "web"))
            kube_sim.faults(error_rate=0.5)
        kube_sim.faults(error_rate=0.0)
        for _ in range(5):  # faults gone: it gets there (if it had not already)
            await ctl.tick()
        assert await replicas_of(api, "web") == 4
        assert values <= {1, 4}
        assert _sample(registry, "switchyard_autoscaler_errors_total", kind="api") >= 1
    finally:
        kube_sim.faults(error_rate=0.0)
        api.close()
