"""``switchyard serve --workers N``: N gateway processes accepting on one listening socket.

The parent binds the socket once (so ``port: 0`` resolves once and a port in use fails
before any worker starts), then starts N worker processes (``spawn``), each running the
whole gateway -- its own event loop, upstream pools, health checker, scraper and routing
state -- on that inherited socket. The kernel hands each new connection to one of the
workers waiting in ``accept``; a connection stays with its worker for its lifetime.

What each worker keeps alone without ``redis_url``: in-flight counts per engine, the
approximate prefix index, VTC counters, EWMAs. Each worker then routes on its own view, so
with N workers a prefix group placed by one worker is unknown to the others (up to N cold
placements per group instead of one) and least-request balances each worker's own share.
The embedded autoscaler's arrivals are per worker too: its leader sizes the fleet from the
requests its own worker accepted, about 1/N of them (a warning at start; the kernel's
uneven hand-out of connections rules out scaling them by N).
With ``redis_url`` each worker is one replica of :mod:`gateway.sharedstate` (its own random
replica id): in-flight counts, prefix records, VTC charges and arrival totals go out every
``redis.sync_interval_s``, exactly as between separate gateways; EWMAs, scrapes and the
recent-routing counts of the balance and placement terms stay per worker. Every worker
probes and scrapes every engine (N times the background load on engines).

The parent supervises: a worker that dies is restarted (at most ``MAX_RESTARTS`` within
``RESTART_WINDOW_S``, then the parent stops all and exits 1). SIGINT/SIGTERM to the parent
are forwarded to the workers, which drain gracefully as a single gateway does; the parent
waits ``graceful_shutdown_s`` plus a backstop, then kills what is left.

Example::

    sys.exit(serve_workers(settings, config_path=Path("switchyard.yaml"), workers=2))
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import anyio

from gateway.logs import configure_logging
from gateway.runner import BACKSTOP_S, build_gateway, serve_gateway
from gateway.settings import Settings

log = logging.getLogger("switchyard")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
POLL_S = 0.2


def bind_listener(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """The shared listening socket (``SO_REUSEADDR``, like uvicorn's own)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: only worker 0 runs the LoRA placement controller (the
    others load on demand and reconcile; N controllers would each act on their own view)."""
    if index == 0 or settings.lora.placement_interval_s == 0:
        return settings
    lora = settings.lora.model_copy(update={"placement_interval_s": 0.0})
    return settings.model_copy(update={"lora": lora})


def die_with_supervisor(supervisor: int) -> bool:
    """Linux: ask the kernel to send this worker SIGTERM when its supervisor dies, even by
    SIGKILL, so no orphan keeps serving on the shared socket; True when that is armed. A
    supervisor already gone before the request took effect gets the same SIGTERM at once."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM) != 0:  # PR_SET_PDEATHSIG
        return False
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _worker_main(
    settings: Settings,
    config_path: Path | None,
    sock: socket.socket,
    supervisor: int,
    index: int,
) -> None:
    """One worker process: the whole gateway on the inherited socket."""
    die_with_supervisor(supervisor)
    configure_logging(settings.log_level, settings.log_format)
    settings = worker_settings(settings, index)
    gateway = build_gateway(settings, config_path=config_path)

    async def started(bound: int) -> None:
        log.info("worker %d (pid %d) serving on port %d", index, os.getpid(), bound)

    try:
        anyio.run(
            partial(serve_gateway, gateway, on_started=started, sockets=[sock]),
            backend="asyncio",
            backend_options={"use_uvloop": settings.server.uvloop},
        )
    except KeyboardInterrupt:
        pass


class _Supervisor:
    """Starts, watches and stops the worker processes (see the module docstring)."""

    def __init__(
        self, settings: Settings, config_path: Path | None, sock: socket.socket, workers: int
    ) -> None:
        self._worker_args = (settings, config_path, sock)
        self._procs: dict[int, BaseProcess] = {}
        self._workers = workers
        self._restarts: list[float] = []
        self._stopping = False
        self._grace = settings.server.graceful_shutdown_s + BACKSTOP_S + 2.0

    def _start(self, index: int) -> BaseProcess:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(
            target=_worker_main,
            args=(*self._worker_args, os.getpid(), index),
            name=f"switchyard-worker-{index}",
        )
        proc.start()
        return proc

    def stop(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("signal %d: stopping %d worker(s)", signum, len(self._procs))
        self._stopping = True
        for proc in self._procs.values():
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    def run(self) -> int:
        for index in range(self._workers):
            self._procs[index] = self._start(index)
        while not self._stopping:
            time.sleep(POLL_S)
            for index, proc in list(self._procs.items()):
                if proc.is_alive() or self._stopping:
                    continue
                if not self._may_restart():
                    log.error(
                        "worker %d exited (code %s) too often; stopping", index, proc.exitcode
                    )
                    self.stop(signal.SIGTERM, None)
                    self._wait()
                    return 1
                log.warning("worker %d exited (code %s); restarting", index, proc.exitcode)
                self._procs[index] = self._start(index)
        return self._wait()

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        self._restarts.append(now)
        return len(self._restarts) <= MAX_RESTARTS

    def _wait(self) -> int:
        deadline = time.monotonic() + self._grace
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        return 0


def serve_workers(
    settings: Settings,
    *,
    config_path: Path | None,
    workers: int,
    on_bound: Callable[[int], None] | None = None,
) -> int:
    """Bind, run ``workers`` processes until SIGINT/SIGTERM, return the exit code."""
    if settings.autoscaling.enabled and not settings.redis_url:
        log.warning("autoscaling with %d workers and no redis_url: the leader counts only its"
                    " own worker's arrivals (set redis_url to share them)", workers)  # fmt: skip
    sock = bind_listener(settings.server.host, settings.server.port)
    if on_bound is not None:
        on_bound(int(sock.getsockname()[1]))
    supervisor = _Supervisor(settings, config_path, sock, workers)
    previous = {sig: signal.signal(sig, supervisor.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
