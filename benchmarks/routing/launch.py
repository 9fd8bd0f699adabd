"""Subprocess launchers: the enginesim cluster, our gateway (one, or replicas sharing a
redis-server started here), and the peer routers.

Each launcher starts one process in its own process group with stdout/stderr in a log file,
waits (bounded) until it answers an HTTP readiness probe, and is stopped by its own PID
(SIGTERM, then SIGKILL after a grace period) -- never by name. Peers run from their own
virtualenvs under ``~/.cache/switchyard/peers`` (``scripts/peers/install.sh``), never from the
project's venv. Every process gets an offline environment (``HF_HUB_OFFLINE`` etc., and
``HF_ENDPOINT`` on a dead loopback port) so nothing reaches the network.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import yaml

from benchmarks.ports import free_port_block

PEER_NAMES = ("sglang-router", "vllm-router")
PEERS_HOME = Path.home() / ".cache" / "switchyard" / "peers"
OFFLINE_ENV = {
    "HF_ENDPOINT": "http://127.0.0.1:9",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "NO_COLOR": "1",
}


class LaunchError(RuntimeError):
    """A process did not start or did not become ready in time (see its log)."""


@dataclass(slots=True)
class Proc:
    """A started process; :meth:`stop` terminates it (and its group) by PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=grace_s)

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) used so far by the process group's live members, plus
        the reaped children of the leader; ``None`` where ``/proc`` is unavailable."""
        total, tick = 0.0, os.sysconf("SC_CLK_TCK")
        try:
            entries = os.listdir("/proc")
        except OSError:
            return None
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    # Fields after the command name (which may hold spaces): state is 3rd.
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) != self.popen.pid:  # process group id
                continue
            used = int(fields[11]) + int(fields[12])  # utime, stime
            if int(entry) == self.popen.pid:
                used += int(fields[13]) + int(fields[14])  # cutime, cstime
            total += used / tick
        return total

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def die_with_parent() -> None:
    """``preexec_fn``: the kernel kills the child when its parent -- the benchmark, or the
    test run (tests/processes.py re-exports it) -- dies (PR_SET_PDEATHSIG, tied to the
    spawning thread: spawn from the main thread), so even a run killed by a timeout leaves
    nothing behind."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    *,
    preexec_fn: Callable[[], object] | None = None,
) -> Proc:
    """``argv`` in its own session, logging to ``log_dir/<name>.log``; ``preexec_fn`` runs in
    the child before exec (e.g. PR_SET_PDEATHSIG)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("wb") as fh:
        popen = subprocess.Popen(  # noqa: S603 - argv is built here, not from user input
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **OFFLINE_ENV, **(env or {})},
            start_new_session=True,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - only where a caller asks for it
        )
    return Proc(name=name, popen=popen, log=log)


class Waitable(Protocol):
    """What :func:`wait_ready` needs of a started process (this module's and the overhead
    benchmark's :class:`Proc`)."""

    name: str

    def alive(self) -> bool: ...

    def stop(self, grace_s: float = 5.0) -> None: ...

    def tail(self, n: int = 20) -> str: ...


def wait_ready(
    proc: Waitable,
    urls: Sequence[str],
    *,
    timeout_s: float,
    method: str = "GET",
    json: object | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Ask every URL until it answers 200 (in order), the process dies, or ``timeout_s``
    passes; a process that never got ready is stopped."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while pending:
            if not proc.alive():
                raise LaunchError(f"{proc.name} exited:\n{proc.tail()}")
            if time.monotonic() > deadline:
                proc.stop()
                raise LaunchError(f"{proc.name} not ready after {timeout_s:g}s:\n{proc.tail()}")
            try:
                r = client.request(method, pending[0], json=json, headers=headers)
                if r.status_code == 200:
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.2)


@dataclass(frozen=True, slots=True)
class EngineCluster:
    proc: Proc
    urls: tuple[str, ...]
    kv_event_urls: tuple[str, ...] = ()

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(f"e{i}" for i in range(len(self.urls)))


def start_enginesim(
    *,
    engines: int,
    profile: str,
    speed: float,
    model: str,
    log_dir: Path,
    kv_events: bool = False,
    extra: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> EngineCluster:
    base = free_port_block(engines * 2)
    argv = [
        sys.executable, "-m", "enginesim",
        "--engines", str(engines),
        "--base-port", str(base),
        "--profile", profile,
        "--speed", str(speed),
        "--model", model,
        *(["--kv-events", "--kv-events-base-port", str(base + engines)] if kv_events else []),
        *extra,
    ]  # fmt: skip
    proc = spawn("enginesim", argv, log_dir)
    urls = tuple(f"http://127.0.0.1:{base + i}" for i in range(engines))
    kv_urls = tuple(f"tcp://127.0.0.1:{base + engines + i}" for i in range(engines))
    wait_ready(proc, [f"{u}/health" for u in urls], timeout_s=timeout_s)
    return EngineCluster(proc=proc, urls=urls, kv_event_urls=kv_urls if kv_events else ())


def start_gateway(
    *,
    policy: str,
    engine_urls: Sequence[str],
    model: str,
    log_dir: Path,
    routing_extra: dict[str, object] | None = None,
    redis_url: str | None = None,
    redis_extra: dict[str, object] | None = None,
    name: str | None = None,
    timeout_s: float = 60.0,
) -> tuple[Proc, str]:
    """``switchyard serve --config <tmp yaml>`` in front of ``engine_urls``; with
    ``redis_url`` it shares its routing state with the other gateways on that Redis
    (``redis_extra``: the ``redis:`` section, e.g. ``sync_interval_s``). ``name`` tells
    replicas' logs apart."""
    name = name or f"gateway-{policy}"
    port = free_port_block(1)
    config: dict[str, object] = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "routing": {"policy": policy, **(routing_extra or {})},
        "engines": [
            {"url": u, "id": f"e{i}", "models": [model]} for i, u in enumerate(engine_urls)
        ],
        "log_level": "WARNING",
    }
    if redis_url is not None:
        config |= {"redis_url": redis_url, "redis": dict(redis_extra or {})}
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).parent / "switchyard"
    proc = spawn(name, [str(exe), "serve", "--config", str(path)], log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, [f"{url}/health"], timeout_s=timeout_s)
    return proc, url


def start_redis(*, log_dir: Path, timeout_s: float = 20.0) -> tuple[Proc, str]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence), for gateway
    replicas sharing routing state; stopped by PID like every other process here."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise LaunchError("redis-server is not installed (make services installs it)")
    port = free_port_block(1)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]  # fmt: skip
    proc = spawn("redis", argv, log_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise LaunchError(f"redis-server exited:\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise LaunchError(f"redis-server not ready after {timeout_s:g}s:\n{proc.tail()}")
        time.sleep(0.05)


def peer_available(peer: str) -> bool:
    return (PEERS_HOME / peer / "bin" / "python").exists()


def start_peer(
    *, peer: str, policy: str, engine_urls: Sequence[str], log_dir: Path, timeout_s: float = 60.0
) -> tuple[Proc, str]:
    """sglang-router or vllm-router (peer-lab.md §2 launch lines) with ``policy``."""
    port = free_port_block(2)
    prom = port + 1
    venv = PEERS_HOME / peer / "bin"
    common = [
        "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *engine_urls,
        "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom),
    ]  # fmt: skip
    if peer == "sglang-router":
        argv = [str(venv / "python"), "-m", "sglang_router.launch_router", *common]
        argv += ["--log-level", "warn"]
    elif peer == "vllm-router":
        argv = [str(venv / "vllm-router"), *common, "--log-level", "warning"]
        argv += ["--worker-startup-check-interval", "1"]
    else:
        raise LaunchError(f"unknown peer {peer!r}")
    if not peer_available(peer):
        raise LaunchError(f"{peer} not installed (run scripts/peers/install.sh)")
    proc = spawn(f"{peer}-{policy}", argv, log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, [f"{url}/health"], timeout_s=timeout_s)
    return proc, url
