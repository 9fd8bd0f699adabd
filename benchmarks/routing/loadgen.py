"""Open-loop load client: replay a workload against a target, streaming, measuring TTFT/ITL.

Each request is sent at its arrival offset (``at_s / speed`` wall seconds after the start)
whether or not earlier ones finished (open loop: a slow target builds a queue instead of
slowing the client down), except multi-turn turns, which also wait for their previous turn
plus its think time. The target is chosen per request by a :class:`Dispatcher`: a fixed URL
(gateway, peer router), several in turn (gateway replicas), or the in-process router of
:mod:`benchmarks.routing.inproc`.

Bounded: at most ``max_in_flight`` concurrent requests (the cap is reported if hit), a
whole-run deadline, per-request timeouts, one shared ``httpx.AsyncClient``. Times are wall
seconds here; the runner converts them to simulated seconds (x speed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx
import orjson

from benchmarks.routing.workloads import BenchRequest

__all__ = [
    "Dispatcher",
    "FixedTarget",
    "RequestHooks",
    "Result",
    "RoundRobinTargets",
    "Routed",
    "run_load",
]


class RequestHooks(Protocol):
    """Callbacks an in-process router uses to keep its per-engine counters."""

    def first_token(self, ttft_s: float) -> None: ...

    def tokens(self, n: int, itl_s: float | None) -> None: ...

    def finish(self, ok: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class Routed:
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)
    hooks: RequestHooks | None = None


class Dispatcher(Protocol):
    def route(self, req: BenchRequest) -> Routed: ...


@dataclass(frozen=True, slots=True)
class FixedTarget:
    """Every request goes to one URL (a gateway or a peer router)."""

    base_url: str
    headers: dict[str, str] = field(default_factory=dict)

    def route(self, req: BenchRequest) -> Routed:
        return Routed(base_url=self.base_url, headers=self.headers)


@dataclass(slots=True)
class RoundRobinTargets:
    """Requests spread over several URLs in turn (gateway replicas behind a client-side
    round-robin, as a Kubernetes Service spreads connections): request ``i`` of the run goes
    to ``base_urls[i % n]``, so every contender sees the same assignment."""

    base_urls: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ValueError("at least one target")

    def route(self, req: BenchRequest) -> Routed:
        return Routed(base_url=self.base_urls[req.idx % len(self.base_urls)], headers=self.headers)


@dataclass(slots=True)
class Result:
    """One request's outcome; times in wall seconds."""

    idx: int
    kind: str
    sent_at: float = 0.0
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.ttft_s is not None


def _body(req: BenchRequest, model: str) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": r, "content": c} for r, c in req.messages],
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if req.user:
        body["user"] = req.user
    return orjson.dumps(body)


async def _one(
    client: httpx.AsyncClient,
    req: BenchRequest,
    routed: Routed,
    model: str,
    result: Result,
) -> None:
    headers = {"content-type": "application/json", **routed.headers}
    if req.session:
        headers["x-session-id"] = req.session
    hooks = routed.hooks
    ok = False
    start = time.perf_counter()
    result.sent_at = start
    last: float | None = None
    try:
        async with client.stream(
            "POST",
            f"{routed.base_url}/v1/chat/completions",
            content=_body(req, model),
            headers=headers,
        ) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"http {resp.status_code}: {resp.text[:200]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    break
                chunk = orjson.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {str(chunk['error'])[:200]}"
                    return
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.output_tokens = usage.get("completion_tokens", result.output_tokens)
                choices = chunk.get("choices") or []
                if not choices or not (choices[0].get("delta") or {}).get("content"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - start
                    if hooks:
                        hooks.first_token(result.ttft_s)
                else:
                    result.itls_s.append(now - last)
                    if hooks:
                        hooks.tokens(1, now - last)
                last = now
            result.e2e_s = time.perf_counter() - start
            ok = result.ttft_s is not None
            if not ok:
                result.error = "no content"
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if hooks:
            hooks.finish(ok)


async def run_load(
    requests: Sequence[BenchRequest],
    dispatcher: Dispatcher,
    *,
    model: str,
    speed: float,
    max_duration_s: float,
    request_timeout_s: float = 120.0,
    max_in_flight: int = 512,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[list[Result], dict[str, Any]]:
    """Replay ``requests``; returns results in request order plus run info."""
    results = [Result(idx=r.idx, kind=r.kind) for r in requests]
    done = [anyio.Event() for _ in requests]
    limiter = anyio.Semaphore(max_in_flight)
    info: dict[str, Any] = {"capped": 0, "not_sent": 0}
    timeout = httpx.Timeout(request_timeout_s, connect=5.0, pool=request_timeout_s)
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as client:
        t0 = time.perf_counter()

        async def launch(i: int, req: BenchRequest) -> None:
            try:
                delay = t0 + req.at_s / speed - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                if req.depends_on is not None:
                    await done[req.depends_on].wait()
                    if not results[req.depends_on].ok:
                        results[i].error = "previous turn failed"
                        return
                    await anyio.sleep(req.think_s / speed)
                if limiter.value == 0:
                    info["capped"] += 1
                async with limiter:
                    with anyio.fail_after(request_timeout_s):
                        await _one(client, req, dispatcher.route(req), model, results[i])
            except TimeoutError:
                results[i].error = "timeout"
            except anyio.get_cancelled_exc_class():
                if results[i].sent_at and results[i].error is None:
                    results[i].error = "cancelled (deadline)"
                raise
            finally:
                done[i].set()

        with anyio.move_on_after(max_duration_s):
            async with anyio.create_task_group() as tg:
                for i, req in enumerate(requests):
                    tg.start_soon(launch, i, req)
        info["wall_s"] = time.perf_counter() - t0
    for r in results:
        if r.sent_at == 0.0 and r.error is None:
            r.error = "not sent (deadline)"
            info["not_sent"] += 1
    return results, info
