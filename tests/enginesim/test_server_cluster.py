"""Running several engines in one process: distinct ports, independent state, clean stop,
and the ``python -m enginesim`` entry point under SIGTERM."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from benchmarks.ports import free_port_block
from enginesim.cluster import ClusterConfig, serve_cluster
from tests.enginesim.server_harness import (
    MODEL,
    metric_families,
    running_cluster,
    sample_value,
)
from tests.processes import reap

REPO = Path(__file__).resolve().parents[2]


def test_four_engines_have_their_own_ports_and_state() -> None:
    cfg = ClusterConfig(engines=4, base_port=0, speed=50.0, model=MODEL)
    with running_cluster(cfg) as engines:
        urls = [e.url for e in engines]
        assert len(set(urls)) == 4
        body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "ignore_eos": True}
        assert httpx.post(urls[2] + "/v1/completions", json=body).status_code == 200
        counts = []
        for url in urls:
            with httpx.Client(base_url=url) as client:
                fams = metric_families(client)
            counts.append(sample_value(fams, "vllm:generation_tokens_total"))
        assert counts == [0, 0, 3, 0]
    for url in urls:  # stopped: nothing listens any more
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2.0)


@pytest.mark.anyio
async def test_serve_cluster_is_cancellable_inside_a_task_group() -> None:
    ready: list[str] = []
    cfg = ClusterConfig(engines=2, base_port=0, speed=50.0, model=MODEL)
    async with anyio.create_task_group() as tg:
        started = anyio.Event()

        def on_ready(urls: list[str]) -> None:
            ready.extend(urls)
            started.set()

        tg.start_soon(lambda: serve_cluster(cfg, on_ready=on_ready))
        with anyio.fail_after(30):
            await started.wait()
        async with httpx.AsyncClient(timeout=10.0) as client:
            # A stream in flight must not block shutdown.
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "ignore_eos": True,
                    "stream": True}  # fmt: skip
            async with client.stream("POST", ready[0] + "/v1/completions", json=body) as resp:
                async for _line in resp.aiter_lines():
                    break
                tg.cancel_scope.cancel()
    async with httpx.AsyncClient(timeout=2.0) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(ready[0] + "/health")


def test_python_m_enginesim_serves_and_exits_cleanly_on_sigterm() -> None:
    port = free_port_block(2)
    argv = [sys.executable, "-m", "enginesim", "--engines", "2", "--base-port", str(port),
            "--model", MODEL, "--speed", "20"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60.0
        healthy = False
        while time.monotonic() < deadline and proc.poll() is None and not healthy:
            try:
                healthy = all(
                    httpx.get(f"http://127.0.0.1:{p}/health", timeout=1.0).status_code == 200
                    for p in (port, port + 1)
                )
            except httpx.HTTPError:
                time.sleep(0.1)
        assert proc.stderr is not None
        assert healthy, proc.stderr.read().decode() if proc.poll() is not None else "no health"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)


def test_python_m_enginesim_exits_1_when_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        argv = [sys.executable, "-m", "enginesim", "--base-port", str(port)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=60)
    assert done.returncode == 1
    assert b"failed to start" in done.stderr


@pytest.mark.parametrize(
    "module",
    ["enginesim.cluster", "enginesim.cli", "enginesim.server"]
    + [f"enginesim.server.{p.stem}" for p in sorted((REPO / "enginesim/server").glob("[a-z]*.py"))],
)
def test_server_modules_export_only_what_exists(module: str) -> None:
    mod = importlib.import_module(module)
    exported = getattr(mod, "__all__", None)
    assert exported, f"{module} has no __all__"
    assert [n for n in exported if not hasattr(mod, n)] == []


@pytest.mark.anyio
async def test_start_engine_runs_one_engine_until_its_context_exits() -> None:
    from enginesim.cluster import start_engine

    cfg = ClusterConfig(base_port=0, speed=50.0, model=MODEL, cold_start_s=1000.0)
    async with start_engine(cfg, index=3) as engine:
        assert engine.index == 3
        assert not engine.runtime.is_ready()  # its own cold start
        async with httpx.AsyncClient(base_url=engine.url) as client:
            assert (await client.get("/health")).status_code == 503
    async with httpx.AsyncClient(base_url=engine.url) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/health", timeout=2.0)
