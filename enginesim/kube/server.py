"""Wiring: store + controller + fault knobs + HTTP on 127.0.0.1, and the CLI entry point.

:func:`serve_kube_sim` runs until cancelled (no signal handlers: embeddable in a task group);
:func:`run_kube_sim` is ``switchyard kube-sim``: it adds SIGINT/SIGTERM handling, prints
``kube-sim ready http://127.0.0.1:P`` once serving and stops every engine on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio

from enginesim.kube.controller import Controller, ControllerConfig
from enginesim.kube.faults import Faults
from enginesim.kube.kubeconfig import write_kubeconfig
from enginesim.kube.resources import NAMESPACES
from enginesim.kube.routes import KubeSim, build_app
from enginesim.kube.store import HISTORY, Store
from enginesim.server.embedded import embedded_server

__all__ = ["KubeSimConfig", "run_kube_sim", "serve_kube_sim"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 1024  # open connections and watches; uvicorn answers 503 beyond
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True, slots=True)
class KubeSimConfig:
    """``port`` 0: a free port. ``speed``: simulated seconds per wall second. ``history``:
    watch events kept (a watch from an older resourceVersion answers 410)."""

    port: int = 0
    host: str = "127.0.0.1"
    kubeconfig: Path | None = None
    speed: float = 1.0
    seed: int = 0
    drain_s: float = 30.0
    history: int = HISTORY
    log_level: str = "warning"


def _seed_namespaces(store: Store) -> None:
    for name in INITIAL_NAMESPACES:
        ns = {"metadata": {"name": name}, "spec": {"finalizers": ["kubernetes"]},
              "status": {"phase": "Active"}}  # fmt: skip
        store.create(NAMESPACES, "", ns)


async def serve_kube_sim(
    cfg: KubeSimConfig, *, on_ready: Callable[[str, KubeSim], None] | None = None
) -> None:
    """Serve until cancelled; ``on_ready`` gets the base URL once it listens."""
    if cfg.speed <= 0:
        raise ValueError("speed must be > 0")
    store = Store(history=cfg.history)
    _seed_namespaces(store)
    ccfg = ControllerConfig(speed=cfg.speed, seed=cfg.seed, drain_s=cfg.drain_s,
                            engine_log_level=cfg.log_level)  # fmt: skip
    controller = Controller(store, ccfg)
    sim = KubeSim(store, controller, Faults(seed=cfg.seed))
    server = embedded_server(
        build_app(sim),
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        limit_concurrency=MAX_CONNECTIONS,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(controller.run)
        task = asyncio.create_task(server.serve())
        try:
            with anyio.fail_after(START_TIMEOUT_S):
                while not server.started:
                    if task.done():
                        task.result()
                        raise RuntimeError(f"kube-sim could not listen on port {cfg.port}")
                    await anyio.sleep(0.01)
            port = int(server.servers[0].sockets[0].getsockname()[1])
            host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
            url = f"http://{host}:{port}"
            sim.address = f"{host}:{port}"
            if cfg.kubeconfig is not None:
                write_kubeconfig(cfg.kubeconfig, url)
            if on_ready is not None:
                on_ready(url, sim)
            await task
            raise RuntimeError("kube-sim's HTTP server stopped unexpectedly")
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            raise RuntimeError(f"kube-sim could not listen on port {cfg.port}") from exc
        finally:
            with anyio.CancelScope(shield=True):
                store.cut_watches()  # open watch streams end now, not at the grace timeout
                server.should_exit = True
                with anyio.move_on_after(STOP_TIMEOUT_S):
                    await asyncio.gather(task, return_exceptions=True)
                task.cancel()
            tg.cancel_scope.cancel()


async def _until_signalled(cfg: KubeSimConfig) -> None:
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("kube-sim: got signal %d, shutting down", signum)
                    tg.cancel_scope.cancel()
                    return

        def ready(url: str, _sim: KubeSim) -> None:
            print(f"kube-sim ready {url}", flush=True)

        tg.start_soon(watch_signals)
        tg.start_soon(partial(serve_kube_sim, cfg, on_ready=ready))


def run_kube_sim(cfg: KubeSimConfig) -> int:
    """``switchyard kube-sim``: serve until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        anyio.run(partial(_until_signalled, cfg), backend="asyncio")
    except KeyboardInterrupt:
        return 0
    except (OSError, RuntimeError, ValueError, ExceptionGroup) as exc:
        for err in _leaves(exc):
            print(f"kube-sim: {err}", file=sys.stderr)
        return 1
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
