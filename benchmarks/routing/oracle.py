"""Oracle bound: what perfect routing on idle engines with unlimited KV cache would give.

For every request, the best possible cache hit is its longest prefix shared with *any*
earlier request (every prefix computed once, kept forever, and the request sent to the engine
holding it); the best possible TTFT is that request's uncached prefill on an idle engine --
no queueing, no batching interference -- timed with the engine profile's step model
(:func:`enginesim.core.timing.step_time`, chunked by ``max_num_batched_tokens``). No router
can beat these numbers on the simulated engines; they bound how much is left to gain.

Shared prefixes are found on 64-byte blocks of the prompt text and converted to tokens in
proportion to the engine-reported prompt length (rounded down to the engine block size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.routing.workloads import BenchRequest
from enginesim.core.profile import EngineProfile
from enginesim.core.timing import BatchShape, step_time
from kvcache.hashing import hash_byte_blocks

BLOCK_BYTES = 64


@dataclass(frozen=True, slots=True)
class OracleRequest:
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float


def cached_fractions(requests: Sequence[BenchRequest], model: str) -> list[float]:
    """Per request (in arrival order): fraction of its prompt shared with an earlier one."""
    seen: set[int] = set()
    out: list[float] = []
    for req in requests:
        text = req.prompt_text().encode()
        hashes = hash_byte_blocks(text, BLOCK_BYTES, model=model)
        n = 0
        while n < len(hashes) and hashes[n] in seen:
            n += 1
        seen.update(hashes)
        out.append(n * BLOCK_BYTES / len(text) if text else 0.0)
    return out


def idle_ttft_s(profile: EngineProfile, prompt_tokens: int, cached_tokens: int) -> float:
    """Prefill of the uncached tokens on an idle engine, chunk by chunk, plus nothing else."""
    start, total = cached_tokens, 0.0
    remaining = max(1, prompt_tokens - cached_tokens)  # vLLM always recomputes >= 1 token
    start = min(start, prompt_tokens - remaining)
    while remaining > 0:
        n = min(remaining, profile.max_num_batched_tokens)
        batch = BatchShape()
        batch.add_prefill(n, start)
        total += step_time(profile, batch)
        start += n
        remaining -= n
    return total


def oracle(
    requests: Sequence[BenchRequest],
    prompt_tokens: Sequence[int | None],
    *,
    profile: EngineProfile,
    model: str,
) -> list[OracleRequest]:
    """The oracle per request; ``prompt_tokens`` are engine-reported (None: unknown, skipped)."""
    out: list[OracleRequest] = []
    block = profile.block_size
    for frac, tokens in zip(cached_fractions(requests, model), prompt_tokens, strict=True):
        if tokens is None:
            continue
        cached = int(tokens * frac) // block * block
        out.append(OracleRequest(tokens, cached, idle_ttft_s(profile, tokens, cached)))
    return out
