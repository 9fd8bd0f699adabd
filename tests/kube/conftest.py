"""Fixtures: ``switchyard kube-sim`` (the emulated Kubernetes API) as a subprocess per test.

>>> def test_x(kube_sim: KubeSimProcess) -> None:
...     v1 = kubernetes.client.CoreV1Api(kube_sim.api())
...     kube_sim.faults(error_rate=0.5)
...     kube_sim.set_ready("default", "engine-abcde", False)

``kube_sim_factory(speed=..., seed=..., drain_s=..., history=...)`` starts more, or with other
flags; every one is killed at teardown and dies with the test run (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.kube.simproc import KubeSimProcess

KubeSimFactory = Callable[..., KubeSimProcess]


@pytest.fixture
def kube_sim_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeSimFactory]:
    started: list[KubeSimProcess] = []

    def start(
        *, speed: float = 1.0, seed: int = 0, drain_s: float = 30.0, history: int = 2000
    ) -> KubeSimProcess:
        workdir = tmp_path_factory.mktemp("kube-sim")
        sim = KubeSimProcess(workdir, speed=speed, seed=seed, drain_s=drain_s, history=history)
        started.append(sim)
        return sim.start()

    try:
        yield start
    finally:
        for sim in started:
            sim.stop()


@pytest.fixture
def kube_sim(kube_sim_factory: KubeSimFactory) -> KubeSimProcess:
    """One emulator at speed 1 (``kube_sim_factory`` for another speed)."""
    return kube_sim_factory()
