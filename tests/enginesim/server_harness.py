"""Test harness for the simulated engine server: run a cluster on free loopback ports in a
background event loop (an anyio blocking portal) and talk to it with sync clients."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import httpx
from anyio.from_thread import start_blocking_portal
from prometheus_client.parser import text_string_to_metric_families

from enginesim.cluster import ClusterConfig, CodecFactory, RunningEngine, serve_cluster

MODEL = "smollm2"  # the served name every server test uses
START_TIMEOUT_S = 30.0


@contextmanager
def running_cluster(
    cfg: ClusterConfig, *, codec_factory: CodecFactory | None = None
) -> Iterator[list[RunningEngine]]:
    """Start ``cfg`` (use ``base_port=0``) and yield its engines; cancel and wait on exit."""
    ready = threading.Event()
    engines: list[RunningEngine] = []

    def on_engines(running: list[RunningEngine]) -> None:
        engines.extend(running)
        ready.set()

    with start_blocking_portal(backend="asyncio") as portal:
        fut = portal.start_task_soon(
            partial(serve_cluster, cfg, on_engines=on_engines, codec_factory=codec_factory)
        )
        waiters: list[concurrent.futures.Future[Any]] = [fut, _event_future(ready)]
        concurrent.futures.wait(
            waiters,
            timeout=START_TIMEOUT_S,
            return_when=concurrent.futures.FIRST_COMPLETED,
        )
        if fut.done():
            fut.result()  # raises the start failure
        assert ready.is_set(), "cluster did not start"
        try:
            yield engines
        finally:
            fut.cancel()
            concurrent.futures.wait([fut], timeout=START_TIMEOUT_S)
            assert fut.done(), "cluster did not stop"


def _event_future(ev: threading.Event) -> concurrent.futures.Future[bool]:
    fut: concurrent.futures.Future[bool] = concurrent.futures.Future()

    def wait() -> None:
        fut.set_result(ev.wait(START_TIMEOUT_S))

    threading.Thread(target=wait, daemon=True).start()
    return fut


def metric_families(client: httpx.Client) -> dict[str, Any]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def sample_value(families: dict[str, Any], sample: str, **labels: str) -> float:
    total = 0.0
    for fam in families.values():
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
