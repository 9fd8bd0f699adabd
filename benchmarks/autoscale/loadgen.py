"""Open-loop streaming load for the autoscaling benchmark, lean on CPU.

Each request of a :class:`~benchmarks.autoscale.traces.Trace` is sent at ``at_s / speed`` wall
seconds after the start, whatever happened to earlier ones (open loop), as a streaming chat
completion with ``ignore_eos`` (exactly ``max_tokens`` tokens). The prompt is ``prompt_tokens``
random pseudo-words (one token each with enginesim's tokenizer) after a per-run salt word, so
no prompt shares a prefix-cache block with another, even across contenders on the same pods.

The client reads raw bytes (aiohttp, no per-event JSON parsing: the benchmark machine has two
shared cores and this client must stay cheap): a network chunk holding ``"delta":{"content":``
carries tokens; TTFT is the first such chunk, the mean inter-token latency is
``(last - first) / (tokens - 1)``. A user gives up after ``ttft_timeout_s`` simulated seconds
without a first token (the disconnect cancels the request upstream), which also bounds the
queue an under-provisioned contender builds. Everything is bounded: a connection cap, per
request deadlines, a whole-run deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import anyio
import orjson

from benchmarks.autoscale.metrics import RequestOutcome
from benchmarks.autoscale.traces import TraceRequest

__all__ = ["LoadResult", "build_bodies", "prompt_words", "run_load"]

_CONTENT = b'"delta":{"content":"'
_VOCAB = tuple(a + b + c for a in "bcdfgklmnprstvz" for b in "aeiou" for c in "bdgklmnprst")


def prompt_words(rng: random.Random, n: int) -> str:
    """``n`` random pseudo-words (one enginesim token each)."""
    return " ".join(rng.choices(_VOCAB, k=n))


@dataclass(slots=True)
class LoadResult:
    """One request's client-side record; times in wall seconds from the run start."""

    at_s: float  # simulated arrival offset (the trace's)
    prompt_tokens: int
    max_tokens: int
    kind: str
    sent_wall: float = 0.0
    first_wall: float | None = None
    last_wall: float | None = None
    tokens: int = 0
    status: int | None = None
    error: str | None = None

    def outcome(self, speed: float) -> RequestOutcome:
        """This request in simulated seconds."""
        ttft = None if self.first_wall is None else (self.first_wall - self.sent_wall) * speed
        itl = None
        if self.first_wall is not None and self.last_wall is not None and self.tokens > 1:
            itl = (self.last_wall - self.first_wall) / (self.tokens - 1) * speed
        ok = self.error is None and self.status == 200 and self.tokens >= self.max_tokens
        return RequestOutcome(at_s=self.at_s, ttft_s=ttft, itl_s=itl, ok=ok)


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    result: LoadResult,
    *,
    t0: float,
    ttft_timeout: float,
    total_timeout: float,
) -> None:
    result.sent_wall = time.perf_counter() - t0
    try:
        with anyio.fail_after(total_timeout):
            async with session.post(
                url, data=body, headers={"content-type": "application/json"}
            ) as resp:
                result.status = resp.status
                if resp.status != 200:
                    result.error = f"http {resp.status}"
                    await resp.read()
                    return
                with anyio.move_on_after(ttft_timeout) as first_scope:
                    async for chunk in resp.content.iter_any():
                        if _CONTENT in chunk:
                            _tokens(result, chunk, t0)
                            break
                        if b'"error"' in chunk:
                            result.error = "stream error"
                            return
                if first_scope.cancelled_caught:
                    result.error = "ttft timeout"
                    return
                async for chunk in resp.content.iter_any():
                    if _CONTENT in chunk:
                        _tokens(result, chunk, t0)
                    elif b'"error"' in chunk:
                        result.error = "stream error"
                        return
    except TimeoutError:
        result.error = "timeout"
    except (aiohttp.ClientError, OSError) as exc:
        result.error = type(exc).__name__


def _prompt(rng: random.Random, salt: str, tokens: int) -> str:
    return f"{salt} {prompt_words(rng, tokens)}"


def _tokens(result: LoadResult, chunk: bytes, t0: float) -> None:
    now = time.perf_counter() - t0
    if result.first_wall is None:
        result.first_wall = now
    result.last_wall = now
    result.tokens += chunk.count(_CONTENT)


def build_bodies(
    requests: Sequence[TraceRequest], *, model: str, salt: str, seed: int
) -> list[bytes]:
    """The request bodies, built before the run starts (prompts fixed by ``seed``)."""
    rng = random.Random(f"prompts:{seed}")
    return [
        orjson.dumps({
            "model": model,
            "messages": [{"role": "user", "content": _prompt(rng, salt, r.prompt_tokens)}],
            "max_tokens": r.max_tokens,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0.0,
        })
        for r in requests
    ]  # fmt: skip


async def run_load(
    requests: Sequence[TraceRequest],
    bodies: Sequence[bytes],
    *,
    url: str,
    speed: float,
    t0: float,
    ttft_timeout_s: float = 60.0,
    request_timeout_s: float = 600.0,
    max_connections: int = 1024,
    grace_s: float = 30.0,
) -> list[LoadResult]:
    """Replay ``requests`` (with their ``bodies``) against ``url`` (a gateway's base URL) from
    the wall instant ``t0`` (``time.perf_counter()``); timeouts in simulated seconds. Returns
    the records in trace order."""
    results = [LoadResult(r.at_s, r.prompt_tokens, r.max_tokens, r.kind) for r in requests]
    endpoint = f"{url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s / speed, connect=5.0)
    end = (max((r.at_s for r in requests), default=0.0) + request_timeout_s) / speed + grace_s
    start = t0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(body: bytes, result: LoadResult) -> None:
            await _one(session, endpoint, body, result, t0=start,
                       ttft_timeout=ttft_timeout_s / speed,
                       total_timeout=request_timeout_s / speed)  # fmt: skip

        with anyio.move_on_after(end):
            async with anyio.create_task_group() as tg:
                for req, body, result in zip(requests, bodies, results, strict=True):
                    delay = start + req.at_s / speed - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    tg.start_soon(send, body, result)
    for r in results:
        if r.status is None and r.error is None:
            r.error = "not sent (deadline)"
    return results
