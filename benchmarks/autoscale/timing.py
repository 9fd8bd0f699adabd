"""Is the compressed engine still faithful? One pod at low load against its profile.

Sends ``n`` standard-size requests one at a time, straight to one Ready pod's engine, and
compares client-side TTFT and mean ITL (simulated seconds) with what the profile's step-time
equation gives for an engine alone (TTFT: the prompt's prefill chunks; ITL: one decode step
at that context). At speed S the host's scheduling jitter is multiplied by S, so this is the
check that S is not too high for the machine.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from typing import Any

import anyio

from benchmarks.autoscale.contenders import PROFILES
from benchmarks.autoscale.loadgen import build_bodies, run_load
from benchmarks.autoscale.traces import TraceRequest

__all__ = ["predicted", "timing_check"]


def predicted(profile: str, prompt: int, output: int) -> tuple[float, float]:
    """(TTFT, mean ITL) in simulated seconds for one request alone on an engine."""
    p = json.loads((PROFILES / f"{profile}.json").read_text())
    n = int(p["max_num_batched_tokens"])
    ttft, done = 0.0, 0
    for _ in range(1000):  # bounded: ceil(prompt / n) chunks
        if done >= prompt:
            break
        size = min(n, prompt - done)
        ttft += p["c0_s"] + p["c_prefill_s"] * size + p["c_attn_s"] * size * (done + size / 2)
        done += size
    itls = [p["c0_s"] + p["c_decode_s"] + p["c_ctx_s"] * (prompt + k + 1) for k in range(1, output)]
    return ttft, statistics.fmean(itls) if itls else 0.0


def timing_check(
    engine_url: str,
    *,
    profile: str,
    speed: float,
    n: int = 12,
    prompt: int = 3000,
    output: int = 32,
) -> dict[str, Any]:
    """Measured vs predicted TTFT/ITL (medians; relative errors) at speed ``speed``."""
    rng = random.Random(7)
    # One at a time: spaced 4 simulated seconds apart (a request takes ~0.8 s alone).
    reqs = [TraceRequest(at_s=4.0 * i, prompt_tokens=prompt + rng.randint(0, 9), max_tokens=output)
            for i in range(n)]  # fmt: skip
    bodies = build_bodies(reqs, model="llama3-8b", salt="timingcheck", seed=7)
    results = anyio.run(_go, reqs, bodies, engine_url, speed)
    outs = [r.outcome(speed) for r in results]
    ttft = [o.ttft_s for o in outs if o.ok and o.ttft_s is not None]
    itl = [o.itl_s for o in outs if o.ok and o.itl_s is not None]
    p_ttft, p_itl = predicted(profile, prompt + 5, output)  # + the chat template's tokens
    m_ttft = statistics.median(ttft) if ttft else None
    m_itl = statistics.median(itl) if itl else None
    return {
        "speed": speed,
        "requests": n,
        "ok": len(ttft),
        "ttft_s": m_ttft,
        "ttft_predicted_s": p_ttft,
        "ttft_rel_error": None if m_ttft is None else m_ttft / p_ttft - 1,
        "itl_s": m_itl,
        "itl_predicted_s": p_itl,
        "itl_rel_error": None if m_itl is None else m_itl / p_itl - 1,
    }


async def _go(reqs: list[TraceRequest], bodies: list[bytes], url: str, speed: float) -> Any:
    return await run_load(reqs, bodies, url=url, speed=speed, t0=time.perf_counter() + 0.1)
