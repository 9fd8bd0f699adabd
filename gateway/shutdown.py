"""Graceful shutdown of proxied requests: let them finish, then end them cleanly.

The CLI stops uvicorn from accepting, waits ``server.graceful_shutdown_s`` for in-flight
requests, then calls :meth:`InFlight.cancel_all`. Each proxied request registers a cancel
callback here while it runs; calling it ends the request the way a failure would (a 503
envelope before the head, one SSE error event after it) instead of uvicorn cancelling the
task and logging a traceback.

Example::

    inflight = InFlight()
    token = inflight.add(lambda: exchange.cancel("shutdown"))
    try:
        ...  # proxy the request
    finally:
        inflight.discard(token)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable


class InFlight:
    """The cancel callbacks of the requests being proxied (one event loop, no locks)."""

    def __init__(self) -> None:
        self._cancels: dict[int, Callable[[], None]] = {}
        self._tokens = itertools.count()
        self.draining = False

    def __len__(self) -> int:
        return len(self._cancels)

    def add(self, cancel: Callable[[], None]) -> int:
        """Register a request's ``cancel``; called at once when already draining."""
        token = next(self._tokens)
        self._cancels[token] = cancel
        if self.draining:
            cancel()
        return token

    def discard(self, token: int) -> None:
        self._cancels.pop(token, None)

    def cancel_all(self) -> int:
        """End every tracked request now; returns how many there were."""
        self.draining = True
        cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel()
        return len(cancels)
