"""Client-side timing of streamed completions, shared by calibration and the engine comparison.

Prompts are lists of token ids (``/v1/completions`` accepts them on both vLLM and enginesim), so
prompt lengths are exact and no tokenizer is needed on the client. Random ids from the middle of
SmolLM2's vocabulary make every prompt unique, so no request hits the prefix cache by accident.
Usage::

    async with engine_client(url) as client:
        timing = await stream_once(client, prompt=random_prompt(rng, 512), max_tokens=16)
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
import httpx

SERVED_MODEL = "smollm2"
_VOCAB_LOW, _VOCAB_HIGH = 1000, 40000


@dataclass(frozen=True, slots=True)
class StreamTiming:
    """When each streamed token of one request arrived, relative to sending it."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    e2e_s: float
    token_times_s: tuple[float, ...]

    @property
    def gaps_s(self) -> tuple[float, ...]:
        """Inter-token gaps (one per decode step this request saw)."""
        t = self.token_times_s
        return tuple(b - a for a, b in zip(t, t[1:], strict=False))


def random_prompt(rng: random.Random, n_tokens: int) -> list[int]:
    return [rng.randrange(_VOCAB_LOW, _VOCAB_HIGH) for _ in range(n_tokens)]


@contextlib.asynccontextmanager
async def engine_client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    timeout = httpx.Timeout(300.0, connect=5.0)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        yield client


async def stream_once(
    client: httpx.AsyncClient,
    *,
    prompt: Sequence[int],
    max_tokens: int,
    model: str = SERVED_MODEL,
) -> StreamTiming:
    """One streamed completion with ``ignore_eos``: exact output length, per-token timestamps."""
    body = {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times: list[float] = []
    usage: dict[str, int] = {}
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread()).decode()[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("choices"):
                times.append(time.perf_counter() - start)
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter() - start
    if not times or not usage:
        raise RuntimeError("stream ended without tokens or usage")
    return StreamTiming(
        prompt_tokens=int(usage["prompt_tokens"]),
        completion_tokens=int(usage["completion_tokens"]),
        ttft_s=times[0],
        e2e_s=end,
        token_times_s=tuple(times),
    )


async def run_batch(
    client: httpx.AsyncClient,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    concurrency: int,
    model: str = SERVED_MODEL,
) -> tuple[list[StreamTiming], float]:
    """Send ``prompts`` with at most ``concurrency`` in flight; timings and total wall seconds."""
    results: list[StreamTiming | None] = [None] * len(prompts)
    limiter = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            results[i] = await stream_once(
                client, prompt=prompts[i], max_tokens=max_tokens, model=model
            )

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    if len(done) != len(prompts):
        raise RuntimeError("some requests did not finish")
    return done, wall


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
