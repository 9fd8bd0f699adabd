"""Processes of the overhead benchmark: each contender and engine in its own session (process
group), stopped by its own PID and killed by the kernel if the benchmark dies; CPU and RSS of
a whole group from ``/proc``; bounded readiness.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.overhead.harness import ProcStat, group_totals, parse_proc_stat
from benchmarks.routing import launch

OFFLINE_ENV = {
    **launch.OFFLINE_ENV,
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "NO_PROXY": "127.0.0.1,localhost",
}
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


LaunchError = launch.LaunchError


def proc_stats() -> list[ProcStat]:
    out: list[ProcStat] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                out.append(parse_proc_stat(fh.read()))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return out


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, RSS bytes) of the live members of this process group."""
        ticks, pages = group_totals(proc_stats(), self.pid)
        return ticks / TICK, pages * PAGE

    def stop(self, grace_s: float = 5.0) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
            self.popen.wait(timeout=grace_s)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.popen.wait(timeout=grace_s)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("wb") as fh:
        popen = subprocess.Popen(  # noqa: S603 - argv is built by the harness
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **OFFLINE_ENV, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            preexec_fn=launch.die_with_parent,  # noqa: PLW1509 - a killed benchmark leaves none
        )
    return Proc(name=name, popen=popen, log=log)


def wait_ready(
    proc: Proc,
    url: str,
    *,
    timeout_s: float,
    method: str = "GET",
    json: object | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Poll ``url`` until it answers 200, the process dies, or ``timeout_s`` passes."""
    launch.wait_ready(proc, [url], timeout_s=timeout_s, method=method, json=json, headers=headers)


@dataclass(slots=True)
class Sampler:
    """Samples a group's RSS every ``every_s`` seconds in a thread (bounded by ``max_s``)."""

    proc: Proc
    every_s: float = 0.5
    max_s: float = 3600.0
    samples: list[tuple[float, int]] = field(default_factory=list)
    on_sample: Callable[[float, int], None] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - t0 < self.max_s:
            _, rss = self.proc.usage()
            now = time.monotonic() - t0
            self.samples.append((now, rss))
            if self.on_sample is not None:
                self.on_sample(now, rss)
            self._stop.wait(self.every_s)

    @property
    def peak(self) -> int:
        return max((r for _, r in self.samples), default=0)
