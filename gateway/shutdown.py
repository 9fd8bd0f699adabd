"""Graceful shutdown of proxied requests: let them finish, then end them cleanly.

The CLI stops uvicorn from accepting, waits ``server.graceful_shutdown_s`` for in-flight
requests, then calls :meth:`InFlight.cancel_all`. Each proxied request runs inside a cancel
scope registered here; cancelling it ends the request the way a failure would (a 503
envelope before the head, one SSE error event after it) instead of uvicorn cancelling the
task and logging a traceback.

Example::

    inflight = InFlight()
    with inflight.track() as scope:
        with scope:
            ...  # proxy the request
        if scope.cancelled_caught:
            ...  # tell the client the gateway is shutting down
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio


class InFlight:
    """The cancel scopes of the requests being proxied (one event loop, no locks)."""

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._scopes)

    @contextmanager
    def track(self, scope: anyio.CancelScope | None = None) -> Iterator[anyio.CancelScope]:
        """Register ``scope`` (a new one by default) until the block exits."""
        scope = scope if scope is not None else anyio.CancelScope()
        if self.draining:
            scope.cancel()
        self._scopes.add(scope)
        try:
            yield scope
        finally:
            self._scopes.discard(scope)

    def cancel_all(self) -> int:
        """End every tracked request now; returns how many there were."""
        self.draining = True
        scopes = list(self._scopes)
        for scope in scopes:
            scope.cancel()
        return len(scopes)
