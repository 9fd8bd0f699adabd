"""Fixtures shared by the simulated-engine server tests: one engine per module on a free port.

A module pins its engine's seed by overriding ``engine_seed``; one that must undo state after
each test (``/admin/faults``) overrides ``http`` on top of this one.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from enginesim.cluster import ClusterConfig, RunningEngine
from tests.enginesim.server_harness import MODEL, running_cluster


@pytest.fixture(scope="module")
def engine_seed() -> int:
    return 0


@pytest.fixture(scope="module")
def engine(engine_seed: int) -> Iterator[RunningEngine]:
    cfg = ClusterConfig(engines=1, base_port=0, speed=50.0, model=MODEL, seed=engine_seed)
    with running_cluster(cfg) as engines:
        yield engines[0]


@pytest.fixture
def http(engine: RunningEngine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.url, timeout=30.0) as client:
        yield client
