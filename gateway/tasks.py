"""Supervised background tasks: restart a crashed loop with capped backoff, never swallow cancel.

Example::

    async with anyio.create_task_group() as tg:
        tg.start_soon(supervise, "health", checker.run)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

log = logging.getLogger(__name__)


async def supervise(
    name: str,
    loop: Callable[[], Awaitable[None]],
    *,
    initial_backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
) -> None:
    """Run ``loop`` until cancelled; if it raises, log and restart it after a backoff."""
    backoff = initial_backoff_s
    while True:
        try:
            await loop()
            log.warning("background task %s returned; restarting", name)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            log.exception("background task %s crashed; restarting in %.1fs", name, backoff)
        await anyio.sleep(backoff)
        backoff = min(max_backoff_s, backoff * 2)
