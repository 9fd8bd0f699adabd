"""A small vLLM-shaped fake engine for exact failure tests (raw ASGI, no dependencies).

Behaviour comes from the engine's attributes (set by the test) and can be overridden per
request by a ``"fake": {...}`` object in the JSON body (the gateway forwards unknown fields,
so this also proves pass-through) or by query parameters when called directly:

``ttft`` (s), ``itl`` (s between tokens), ``tokens`` (output tokens, else ``max_tokens``),
``status`` (answer this HTTP status with an error envelope), ``hang`` (never answer),
``cut_after`` (stream this many tokens, then drop the connection).

Counters (``requests``, ``running``, ``cancelled``) and ``bodies`` (raw bytes received) let
tests check what the engine saw.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import Message, Receive, Scope, Send


@dataclass
class FakeEngine:
    name: str = "fake"
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    adapters: dict[str, str] = field(default_factory=dict)  # adapter -> base model
    health_status: int = 200
    ttft: float = 0.0
    itl: float = 0.0
    tokens: int = 5
    status: int | None = None
    requests: int = 0
    running: int = 0
    cancelled: int = 0
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    metrics_text: str | None = None  # GET /metrics answers this (Prometheus text), else 404
    metrics_paths: tuple[str, ...] = ("/metrics",)  # where metrics_text is served
    metrics_asks: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    """Path, query string and headers of the last 8 GETs of a /metrics path (newest last)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/health" and method == "GET":
            await _send_json(send, self.health_status, {} if self.health_status == 200 else {})
        elif path == "/v1/models" and method == "GET":
            await _send_json(send, 200, self._models())
        elif path.startswith("/metrics") and method == "GET" and self._ask(scope):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4")]})  # fmt: skip
            await send({"type": "http.response.body", "body": self.metrics_text.encode()})
        elif path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            await self._generate(scope, receive, send, path)
        else:
            await _send_json(send, 404, {"error": {"message": "nope", "type": "NotFound"}})

    def _ask(self, scope: Scope) -> bool:
        """Record a metrics GET; whether it is answered with ``metrics_text``."""
        asked = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.metrics_asks.append((scope["path"], scope["query_string"], asked))
        del self.metrics_asks[:-8]
        return self.metrics_text is not None and scope["path"] in self.metrics_paths

    def _models(self) -> dict[str, Any]:
        data: list[dict[str, Any]] = [
            {
                "id": m,
                "object": "model",
                "created": 1,
                "owned_by": "vllm",
                "root": m,
                "parent": None,
            }
            for m in self.models
        ]
        data += [
            {"id": a, "object": "model", "created": 1, "owned_by": "vllm", "root": f"/a/{a}",
             "parent": base}
            for a, base in self.adapters.items()
        ]  # fmt: skip
        return {"object": "list", "data": data}

    def _knobs(self, scope: Scope, body: dict[str, Any]) -> dict[str, Any]:
        knobs: dict[str, Any] = {
            "ttft": self.ttft,
            "itl": self.itl,
            "tokens": body.get("max_tokens") or self.tokens,
            "status": self.status,
            "hang": False,
            "cut_after": None,
        }
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
        for key, values in query.items():
            knobs[key] = json.loads(values[-1])
        fake = body.get("fake")
        if isinstance(fake, dict):
            knobs.update(fake)
        return knobs

    async def _generate(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests += 1
        self.bodies.append(raw)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        body = json.loads(raw)
        knobs = self._knobs(scope, body)
        self.running += 1
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.cancelled += 1
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await self._answer(send, path, body, knobs)
                tg.cancel_scope.cancel()
        finally:
            self.running -= 1

    async def _answer(
        self, send: Send, path: str, body: dict[str, Any], knobs: dict[str, Any]
    ) -> None:
        if knobs["hang"]:
            await anyio.sleep_forever()
        if knobs["status"]:
            status = int(knobs["status"])
            err = {"error": {"message": f"{self.name} fails", "type": "Injected", "code": status}}
            await _send_json(send, status, err)
            return
        n = int(knobs["tokens"])
        if body.get("stream"):
            # Like vLLM (a Starlette StreamingResponse): headers first, then the first token.
            await self._stream(send, body, knobs, path == "/v1/chat/completions", n)
            return
        await anyio.sleep(float(knobs["ttft"]))
        if path == "/v1/embeddings":
            vectors = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]
            usage = {"prompt_tokens": 1, "total_tokens": 1}
            payload = {"object": "list", "data": vectors, "model": body["model"], "usage": usage}
            await _send_json(send, 200, payload)
            return
        chat = path == "/v1/chat/completions"
        text = "".join(f"tok{i} " for i in range(n))
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "length"}
            if chat else {"index": 0, "text": text, "finish_reason": "length"}
        )  # fmt: skip
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
        await _send_json(send, 200, {
            "id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body["model"], "choices": [choice],
            "usage": usage,
        })  # fmt: skip

    async def _stream(
        self, send: Send, body: dict[str, Any], knobs: dict[str, Any], chat: bool, n: int
    ) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"x-fake-engine", self.name.encode())]})  # fmt: skip
        obj = "chat.completion.chunk" if chat else "text_completion"
        await anyio.sleep(float(knobs["ttft"]))

        def event(choices: list[dict[str, Any]], usage: Any = None) -> Message:
            data = {"id": "cmpl-fake", "object": obj, "created": 1, "model": body["model"],
                    "choices": choices, "usage": usage}  # fmt: skip
            chunk = b"data: " + json.dumps(data).encode() + b"\n\n"
            return {"type": "http.response.body", "body": chunk, "more_body": True}

        if chat:
            delta = {"role": "assistant", "content": ""}
            await send(event([{"index": 0, "delta": delta, "finish_reason": None}]))
        cut_after = knobs["cut_after"]
        for i in range(n):
            if cut_after is not None and i >= int(cut_after):
                return  # drop the connection mid-stream (the server closes it)
            if i:
                await anyio.sleep(float(knobs["itl"]))
            piece = f"tok{i} "
            choice = (
                {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                if chat else {"index": 0, "text": piece, "finish_reason": None}
            )  # fmt: skip
            await send(event([choice]))
        final = (
            {"index": 0, "delta": {}, "finish_reason": "length"}
            if chat else {"index": 0, "text": "", "finish_reason": "length"}
        )  # fmt: skip
        await send(event([final]))
        opts = body.get("stream_options") or {}
        if opts.get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
            await send(event([], usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _send_json(send: Send, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
