"""Process handling of the routing benchmark's launchers (only processes we start here)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from benchmarks.ports import free_port, free_port_block, free_ports
from benchmarks.routing import launch


@pytest.mark.parametrize("n", [1, 3, 8])
def test_free_port_block_is_bindable(n: int) -> None:
    base = free_port_block(n)
    socks = []
    try:
        for p in range(base, base + n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", p))
    finally:
        for s in socks:
            s.close()


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    socks = [socket.socket() for _ in ports]
    try:
        for s, p in zip(socks, ports, strict=True):
            s.bind(("127.0.0.1", p))
    finally:
        for s in socks:
            s.close()


def test_free_port_is_bindable_and_an_empty_block_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
    with pytest.raises(ValueError):
        free_port_block(0)


def test_spawn_stop_and_tail(tmp_path: Path) -> None:
    code = "import time; print('hello', flush=True); time.sleep(60)"
    proc = launch.spawn("sleeper", [sys.executable, "-c", code], tmp_path)
    try:
        with pytest.raises(launch.LaunchError, match="not ready"):
            launch.wait_ready(proc, ["http://127.0.0.1:9/health"], timeout_s=0.5)
        assert not proc.alive()  # wait_ready stops a process that never got ready
    finally:
        proc.stop()
    assert "hello" in proc.tail()
    proc.stop()  # idempotent


def test_wait_ready_reports_an_exited_process(tmp_path: Path) -> None:
    proc = launch.spawn("crasher", [sys.executable, "-c", "raise SystemExit('boom')"], tmp_path)
    proc.popen.wait(timeout=30)
    with pytest.raises(launch.LaunchError, match="exited"):
        launch.wait_ready(proc, ["http://127.0.0.1:9/health"], timeout_s=5)


def test_unknown_peer_and_missing_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(launch.LaunchError, match="unknown peer"):
        launch.start_peer(peer="nope", policy="x", engine_urls=[], log_dir=tmp_path)
    monkeypatch.setattr(launch, "PEERS_HOME", tmp_path)
    assert not launch.peer_available("sglang-router")
    with pytest.raises(launch.LaunchError, match="not installed"):
        launch.start_peer(peer="sglang-router", policy="x", engine_urls=[], log_dir=tmp_path)
