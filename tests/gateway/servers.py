"""Run an ASGI app on a real loopback socket in a background thread (its own event loop).

Tests stay synchronous (or use their own loop) while the servers run for real: real TCP,
real keep-alive, real disconnects. Ports are picked by the OS (``port=0``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gateway.server import EmbeddedServer, bound_port, make_server


class ServerThread:
    """``with ServerThread(app) as srv: srv.url`` — a live server until the block exits."""

    def __init__(self, app: Any, *, log_level: str = "warning") -> None:
        self.server: EmbeddedServer = make_server(
            app, host="127.0.0.1", port=0, log_level=log_level, graceful_shutdown_s=2
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        self.port = bound_port(self.server)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running(app: Any) -> Iterator[ServerThread]:
    with ServerThread(app) as srv:
        yield srv


def wait_until(predicate: Any, *, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value (bounded loop)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
