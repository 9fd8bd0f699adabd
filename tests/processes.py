"""Helpers for tests that run the CLI as a subprocess."""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from typing import Any, Self

from benchmarks.routing.launch import die_with_parent

__all__ = ["Processes", "die_with_parent", "reap"]


def reap(proc: subprocess.Popen[Any]) -> None:
    """A test's ``finally``: kill ``proc`` if it still runs, then close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


class Processes(ABC):
    """``with`` for test servers made of processes: ``start()`` (stopped again if it fails
    half-way) on the way in, ``stop()`` on the way out."""

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
