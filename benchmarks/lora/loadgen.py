"""Open-loop streaming load for the LoRA benchmark, and a poller of what each engine holds.

Each :class:`~benchmarks.lora.traces.TraceRequest` is sent ``at_s / speed`` wall seconds after
the start whatever happened to earlier ones, as a streaming chat completion for
``model=<adapter>`` with ``ignore_eos`` (exactly ``max_tokens`` tokens) and temperature 0. Where
it goes is the contender's :class:`Target`: the gateway's URL (ours), or a benchmark-side
:class:`~benchmarks.lora.router.ClientRouter` that picks an engine and loads the adapter there
first (the baselines). TTFT is measured from the arrival instant, so a wait for an adapter load
is part of it. Prompts are pseudo-words (one enginesim token each) after a per-run salt, so no
two requests share a prefix-cache block. Bounded: a connection cap, a first-token timeout
(the user gives up), a whole-run deadline. Usage::

    records = await run_load(trace, target, speed=4.0, session=session, salt="r1")
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import anyio
import orjson

from benchmarks.autoscale.loadgen import prompt_words
from benchmarks.lora.metrics import RequestRecord, ResidencySample
from benchmarks.lora.router import ClientRouter, RouteError
from benchmarks.lora.traces import TraceRequest

__all__ = [
    "GatewayTarget",
    "ProgressHook",
    "RouterTarget",
    "Target",
    "poll_residency",
    "run_load",
]

_CONTENT = b'"delta":{"content":"'
MAX_RETRIES = 2  # the OpenAI Python SDK's default max_retries (it retries 429/503)


class ProgressHook(Protocol):
    """Called after each request is sent: (requests sent so far, its simulated arrival)."""

    def __call__(self, sent: int, at_s: float) -> None: ...


class Target(Protocol):
    """Where one request goes: yields (base URL, wall seconds waited for a load or None)."""

    def route(self, adapter: str) -> contextlib.AbstractAsyncContextManager[
        tuple[str, float | None]
    ]: ...  # fmt: skip


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    """Every request to one gateway (it routes and loads; its waits are in its metrics)."""

    url: str

    @contextlib.asynccontextmanager
    async def route(self, adapter: str) -> AsyncIterator[tuple[str, float | None]]:
        del adapter
        yield self.url, None


@dataclass(frozen=True, slots=True)
class RouterTarget:
    """A baseline: the benchmark-side router picks the engine and loads on demand."""

    router: ClientRouter

    def route(self, adapter: str) -> contextlib.AbstractAsyncContextManager[
        tuple[str, float | None]
    ]:  # fmt: skip
        return self.router.route(adapter)


@dataclass(slots=True)
class _Record:
    req: TraceRequest
    sent: float = 0.0
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    ok: bool = False
    waited: float | None = None
    error: str | None = None
    retries: int = 0

    def to_record(self, speed: float) -> RequestRecord:
        ttft = None if self.first is None else (self.first - self.sent) * speed
        itl = None
        if self.first is not None and self.last is not None and self.tokens > 1:
            itl = (self.last - self.first) / (self.tokens - 1) * speed
        return RequestRecord(
            at_s=self.req.at_s,
            adapter=self.req.adapter,
            ttft_s=ttft,
            itl_s=itl,
            tokens=self.tokens,
            ok=self.ok and self.tokens >= self.req.max_tokens,
            load_wait_s=None if self.waited is None else self.waited * speed,
            error=self.error,
            retries=self.retries,
        )


def _body(req: TraceRequest, rng: random.Random, salt: str) -> bytes:
    return orjson.dumps({
        "model": req.adapter,
        "messages": [{"role": "user",
                      "content": f"{salt} {prompt_words(rng, req.prompt_tokens)}"}],
        "max_tokens": req.max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
    })  # fmt: skip


async def _one(
    session: aiohttp.ClientSession,
    target: Target,
    body: bytes,
    rec: _Record,
    *,
    t0: float,
    ttft_timeout: float,
    total_timeout: float,
) -> None:
    rec.sent = time.perf_counter() - t0
    try:
        with anyio.fail_after(total_timeout):
            async with target.route(rec.req.adapter) as (url, waited):
                rec.waited = waited
                for attempt in range(MAX_RETRIES + 1):
                    retry_in = await _stream(session, url, body, rec, t0=t0,
                                             ttft_timeout=ttft_timeout)  # fmt: skip
                    if retry_in is None or attempt == MAX_RETRIES:
                        break
                    rec.retries += 1
                    rec.error = None
                    await anyio.sleep(retry_in)
    except TimeoutError:
        rec.error = "timeout"
    except RouteError as exc:
        rec.error = f"route: {exc}"[:200]
    except (aiohttp.ClientError, OSError) as exc:
        rec.error = type(exc).__name__


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    rec: _Record,
    *,
    t0: float,
    ttft_timeout: float,
) -> float | None:
    """Stream one answer into ``rec``; returns the wall seconds to wait before a retry when the
    answer was a retryable 429/503 (the OpenAI SDK's rule: ``retry-after-ms``/``retry-after``
    up to 60 s, else 0.5 s doubling), else None."""
    headers = {"content-type": "application/json"}
    async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as resp:
        if resp.status != 200:
            rec.error = f"http {resp.status}: {(await resp.read())[:160]!r}"
            if resp.status in (429, 503):
                return _retry_delay(resp.headers, rec.retries)
            return None
        first_deadline = t0 + rec.sent + ttft_timeout
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            if b'"error"' in chunk:
                rec.error = "stream error"
                return None
            n = chunk.count(_CONTENT)
            if n:
                rec.first = rec.first if rec.first is not None else now - t0
                rec.last = now - t0
                rec.tokens += n
            elif rec.first is None and now > first_deadline:
                rec.error = "ttft timeout"
                return None
        rec.ok = True
    return None


def _retry_delay(headers: Mapping[str, str], retries: int) -> float:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        with contextlib.suppress(KeyError, ValueError):
            delay = float(headers[name]) * scale
            if 0.0 < delay <= 60.0:
                return delay
    return min(0.5 * 2.0**retries, 8.0)


async def run_load(
    trace: Sequence[TraceRequest],
    target: Target,
    *,
    speed: float,
    session: aiohttp.ClientSession,
    salt: str,
    seed: int = 0,
    ttft_timeout_s: float = 120.0,
    request_timeout_s: float = 300.0,
    grace_s: float = 30.0,
    progress: ProgressHook | None = None,
) -> list[RequestRecord]:
    """Replay ``trace`` open-loop (timeouts in simulated seconds); records in trace order."""
    rng = random.Random(f"prompts:{seed}")
    bodies = [_body(r, rng, salt) for r in trace]
    recs = [_Record(r) for r in trace]
    end = (max((r.at_s for r in trace), default=0.0) + request_timeout_s) / speed + grace_s
    t0 = time.perf_counter()
    with anyio.move_on_after(end):
        async with anyio.create_task_group() as tg:
            for i, (req, body, rec) in enumerate(zip(trace, bodies, recs, strict=True)):
                delay = t0 + req.at_s / speed - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                one = functools.partial(_one, session, target, body, rec, t0=t0,
                                        ttft_timeout=ttft_timeout_s / speed,
                                        total_timeout=request_timeout_s / speed)  # fmt: skip
                tg.start_soon(one)
                if progress is not None:
                    progress(i + 1, req.at_s)
    return [r.to_record(speed) for r in recs]


async def poll_residency(
    session: aiohttp.ClientSession,
    engines: Mapping[str, str],
    *,
    speed: float,
    t0: float,
    interval_s: float,
    out: list[ResidencySample],
) -> None:
    """Every ``interval_s`` wall seconds, which adapters each engine lists in ``/v1/models``
    (entries with a ``parent``); appended to ``out`` in simulated seconds since ``t0``. Runs
    until cancelled; a failed poll of an engine keeps its last answer."""
    last: dict[str, frozenset[str]] = dict.fromkeys(engines, frozenset())
    timeout = aiohttp.ClientTimeout(total=5.0)
    while True:
        for eid, url in engines.items():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"{url}/v1/models", timeout=timeout) as r:
                    data = orjson.loads(await r.read())["data"]
                last[eid] = frozenset(m["id"] for m in data if m.get("parent"))
        out.append(ResidencySample((time.perf_counter() - t0) * speed, dict(last)))
        await anyio.sleep(interval_s)
