"""A lean fake OpenAI/vLLM engine for the overhead benchmark: uvloop + a raw
``asyncio.Protocol`` with ``httptools`` parsing, HTTP/1.1 keep-alive, TCP_NODELAY.

    python -m benchmarks.overhead.fake_engine --port P --delay-ms D --tokens N --itl-ms T

Non-stream completions answer after ``delay-ms``; ``"stream": true`` answers with SSE: the
role delta after ``delay-ms``, then ``min(max_tokens, N)`` content chunks one per ``itl-ms``,
a finish chunk, a usage chunk when ``stream_options.include_usage``, ``data: [DONE]``.
``vllm:num_requests_running`` counts requests in progress; a client that goes away mid-stream
ends its stream (the transport is closed) and is counted down. ``GET /stats`` returns the
per-path request counts and how many streams finished or were cut (the harness checks the
load split and that every stream ended).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections import Counter
from typing import Any

import httptools
import orjson

from benchmarks.overhead import replies

COMPLETIONS = {b"/v1/chat/completions": True, b"/v1/completions": False}
RENDER = {b"/v1/chat/completions/render": True, b"/v1/completions/render": False}


class Engine:
    """Engine-wide state: knobs, the running gauge, counters."""

    def __init__(self, delay_ms: float, tokens: int, itl_ms: float) -> None:
        self.delay_s = delay_ms / 1000.0
        self.tokens = tokens
        self.itl_s = itl_ms / 1000.0
        self.running = 0
        self.counts: Counter[str] = Counter()
        self.streams_done = 0
        self.streams_cut = 0

    def stats(self) -> bytes:
        return replies.json_reply(
            {"running": self.running, "counts": dict(self.counts),
             "streams_done": self.streams_done, "streams_cut": self.streams_cut}
        )  # fmt: skip


class HttpConnection(asyncio.Protocol):
    """One client connection; requests are answered in order (no pipelining overlap)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.queue: list[tuple[bytes, bytes, bytes, bool]] = []
        self.busy = False
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(replies.BAD_REQUEST)
            self._close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        keep = self.parser.should_keep_alive()
        self.queue.append((method, self.url.split(b"?", 1)[0], b"".join(self.body), keep))
        if not self.busy:
            self._next()

    # request handling
    def _write(self, data: bytes) -> bool:
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _next(self) -> None:
        """Answer queued requests; a delayed or streamed one resumes here when done."""
        while self.queue and not self.closed:
            method, path, body, keep = self.queue.pop(0)
            self.engine.counts[path.decode("latin-1")] += 1
            if path in COMPLETIONS and method == b"POST":
                self.busy = True
                self._completion(COMPLETIONS[path], body, keep)
                return
            self._write(self._simple(method, path, body))
            if not keep:
                self._close()
                return
        self.busy = False

    def _done(self, keep: bool) -> None:
        self.engine.running -= 1
        if not keep:
            self._close()
        self.busy = False
        self._next()

    def _simple(self, method: bytes, path: bytes, body: bytes) -> bytes:
        e = self.engine
        if path == b"/health":
            return replies.HEALTH
        if path in (b"/metrics", b"/metrics/"):
            return replies.metrics_reply(e.running, e.counts)
        if path == b"/v1/models":
            return replies.MODELS
        if path in (b"/server_info", b"/get_server_info"):
            return replies.SERVER_INFO
        if path in (b"/model_info", b"/get_model_info"):
            return replies.MODEL_INFO
        if path == b"/get_load":
            return replies.load_reply(e.running)
        if path == b"/stats":
            return e.stats()
        if method == b"POST" and (path in RENDER or path == b"/tokenize"):
            try:
                req = orjson.loads(body)
            except orjson.JSONDecodeError:
                return replies.BAD_REQUEST
            if path == b"/tokenize":
                return replies.tokenize_reply(req)
            return replies.render_reply(req, RENDER[path])
        return replies.NOT_FOUND

    def _completion(self, chat: bool, body: bytes, keep: bool) -> None:
        try:
            req: dict[str, Any] = orjson.loads(body)
        except orjson.JSONDecodeError:
            req = {}
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens") or self.engine.tokens
        n = max(1, min(int(max_tokens), self.engine.tokens))
        prompt_tokens = max(1, len(body) // 4)
        self.engine.running += 1
        if req.get("stream"):
            opts = req.get("stream_options") or {}
            usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
            self.loop.create_task(self._stream(chat, n, prompt_tokens, usage, keep))
            return
        reply = replies.completion_reply(chat, n, prompt_tokens)
        if self.engine.delay_s > 0:
            self.loop.call_later(self.engine.delay_s, self._reply_later, reply, keep)
        else:
            self._write(reply)
            self._done(keep)

    def _reply_later(self, reply: bytes, keep: bool) -> None:
        self._write(reply)
        self._done(keep)

    async def _stream(
        self, chat: bool, n: int, prompt_tokens: int, usage: bool, keep: bool
    ) -> None:
        e = self.engine
        first, token, finish = replies.stream_parts(chat)
        ok = False
        try:
            if e.delay_s > 0:
                await asyncio.sleep(e.delay_s)
            if not self._write(first):
                return
            for _ in range(n):
                if e.itl_s > 0:
                    await asyncio.sleep(e.itl_s)
                if not self._write(token):
                    return
            ok = self._write(finish + replies.stream_tail(chat, usage, prompt_tokens, n))
        finally:
            if ok:
                e.streams_done += 1
            else:
                e.streams_cut += 1
            self._done(keep)


async def serve(host: str, port: int, engine: Engine) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HttpConnection(engine), host, port, reuse_address=True, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--itl-ms", type=float, default=1.0)
    args = ap.parse_args(argv)
    import uvloop

    engine = Engine(args.delay_ms, args.tokens, args.itl_ms)
    try:
        uvloop.run(serve(args.host, args.port, engine))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
