"""A real ``redis-server`` on a free loopback port, for one test (no shared state between
runs). It can be stopped and started again on the same port (Redis outage tests).

``make test`` installs redis-server when it is missing (scripts/services.sh); a machine
without it fails these tests rather than skipping them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from typing import Any

from benchmarks.ports import free_port
from tests.processes import Processes, die_with_parent, reap


class RedisServer(Processes):
    """``with RedisServer() as r: r.url``; ``r.stop()`` / ``r.start()`` for outages."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.binary = binary
        self.port = port or free_port()
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no",
                "--loglevel", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(  # noqa: S603
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Kill the server (SIGKILL: an outage, not a clean shutdown); data is lost."""
        if self.proc is not None:
            reap(self.proc)
            self.proc = None
