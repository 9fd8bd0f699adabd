"""Replicas that share routing state through one Redis, built in-process and synced by hand.

Used by tests/gateway/test_sharedstate.py (one redis-server) and
tests/gateway/test_redis_topologies.py (Sentinel and Cluster): each replica is a
:class:`Services` with the prefix-cache policy over the same two engines (never called:
state only), both engines marked healthy, and a short Redis timeout and retry.

Example::

    async with build_replicas(redis_url) as (a, b):
        await sync_by_hand(a, b)
        assert shared_state(a).replicas() == 2
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from gateway.services import Services
from gateway.settings import EngineConfig, Settings
from gateway.sharedstate import SharedRoutingState

ENGINES = ("http://127.0.0.1:9/a", "http://127.0.0.1:9/b")  # never called: state only
MODEL = "fake-model"


def replica_settings(redis_url: str, **redis: Any) -> Settings:
    """One replica's settings; ``redis`` overrides the ``redis`` section (``key_prefix``)."""
    config: dict[str, Any] = {
        "engines": [
            EngineConfig(url=u, id=f"e{i}", models=(MODEL,)) for i, u in enumerate(ENGINES)
        ],
        "routing": {"policy": "prefix-cache"},
        "redis_url": redis_url,
        "redis": {"timeout_s": 0.5, "retry_s": 0.05, **redis},
    }
    return Settings(**config)


@asynccontextmanager
async def build_replicas(redis_url: str, n: int = 2, **redis: Any) -> AsyncIterator[list[Services]]:
    """``n`` replicas on ``redis_url`` with healthy engines, closed on the way out; no
    background sync runs (call :func:`sync_by_hand`)."""
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            services = Services.build(replica_settings(redis_url, **redis))
            stack.push_async_callback(services.aclose)
            for state in services.endpoints:
                state.record_probe(True, fail_threshold=1, success_threshold=1)
            out.append(services)
        yield out


def shared_state(services: Services) -> SharedRoutingState:
    assert services.shared is not None
    return services.shared


async def sync_by_hand(*replicas: Services) -> None:
    """One sync of each replica, in the order given; each must reach Redis."""
    for services in replicas:
        assert await shared_state(services).sync_once()
