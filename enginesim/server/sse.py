"""A raw-ASGI streaming response for Server-Sent Events that notices client disconnects.

The producer runs inside a task group next to a watcher on ``receive()``: when the client goes
away the producer is cancelled (its ``finally`` blocks abort the core requests, freeing slots).
A producer raising :class:`StreamCrash` makes the response end without its final empty body
frame, so uvicorn closes the connection mid-stream (the ``crash_mid_stream_after_tokens`` fault).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["Emit", "SSEResponse", "StreamCrash", "wait_disconnect"]

Emit = Callable[[bytes], Awaitable[None]]


class StreamCrash(Exception):
    """Raised by a producer to cut the connection without finishing the response."""


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the request body must already be consumed)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """``text/event-stream`` response driven by ``producer(emit)``.

    >>> return SSEResponse(lambda emit: emit(b"data: [DONE]\\n\\n"))
    """

    media_type = "text/event-stream"

    def __init__(self, producer: Callable[[Emit], Awaitable[None]]) -> None:
        super().__init__(content=None, status_code=200, media_type=self.media_type)
        self._producer = producer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        complete = True
        gone = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal gone
                await wait_disconnect(receive)
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self._producer(emit)
            except StreamCrash:
                complete = False
            except OSError:  # the client vanished while we were writing
                complete = False
            tg.cancel_scope.cancel()
        if complete and not gone:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass
