"""Run one small workload against the real vLLM engine and enginesim and compare them.

Run: ``make bench-engine`` (or ``.venv/bin/python -m benchmarks.engine.compare``). The workload:
8 requests of 300 random prompt tokens (unique, so no prefix hits) and 64 output tokens
(``ignore_eos``), streamed, at concurrency 1 and 4, after 2 warm-up requests. Both engines get
the same prompts. Engines run one after the other (2 shared cores): the real one with the
contract-suite flags (eager + LoRA, the configuration ``cpu-smollm2`` is calibrated for), then
``enginesim --profile cpu-smollm2`` at speed 1.

Prints TTFT p50, inter-token latency p50 and aggregate output tokens/s side by side with
sim/real ratios, flags any ratio outside ±25 %, and writes ``results/engine_compare.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from benchmarks.engine.calibrate import hardware
from benchmarks.engine.launch import (
    DEFAULT_HOME,
    REPO_ROOT,
    RealEngineLayout,
    RunningEngine,
    start_enginesim,
    start_vllm,
)
from benchmarks.engine.measure import engine_client, median, random_prompt, run_batch, stream_once

RESULTS_PATH = REPO_ROOT / "results" / "engine_compare.json"
NUM_REQUESTS = 8
PROMPT_TOKENS = 300
OUTPUT_TOKENS = 64
CONCURRENCIES = (1, 4)
TOLERANCE = 0.25
METRICS = ("ttft_p50_ms", "itl_p50_ms", "output_tok_per_s")


def workload(seed: int) -> dict[int, list[list[int]]]:
    """The same prompts for every engine: per concurrency level, NUM_REQUESTS unique prompts."""
    rng = random.Random(seed)
    return {
        c: [random_prompt(rng, PROMPT_TOKENS) for _ in range(NUM_REQUESTS)] for c in CONCURRENCIES
    }


async def run_workload(
    base_url: str, prompts: dict[int, list[list[int]]], *, seed: int
) -> dict[str, dict[str, float]]:
    rng = random.Random(seed + 1)
    out: dict[str, dict[str, float]] = {}
    async with engine_client(base_url) as client:
        for _ in range(2):
            await stream_once(client, prompt=random_prompt(rng, PROMPT_TOKENS), max_tokens=8)
        for conc, batch in prompts.items():
            timings, wall = await run_batch(
                client, batch, max_tokens=OUTPUT_TOKENS, concurrency=conc
            )
            tokens = sum(t.completion_tokens for t in timings)
            if tokens != NUM_REQUESTS * OUTPUT_TOKENS:
                raise RuntimeError(f"expected {NUM_REQUESTS * OUTPUT_TOKENS} tokens, got {tokens}")
            out[f"c{conc}"] = {
                "ttft_p50_ms": median([t.ttft_s for t in timings]) * 1e3,
                "itl_p50_ms": median([g for t in timings for g in t.gaps_s]) * 1e3,
                "output_tok_per_s": tokens / wall,
                "e2e_p50_s": median([t.e2e_s for t in timings]),
                "wall_s": wall,
            }
    return out


@contextlib.contextmanager
def _engine(kind: str, home: Path) -> Iterator[RunningEngine]:
    if kind == "vllm":
        with start_vllm(RealEngineLayout.from_home(home)) as engine:
            yield engine
    else:
        tokenizer = RealEngineLayout.from_home(home).tokenizer
        with start_enginesim(
            python=Path(sys.executable),
            profile="cpu-smollm2",
            tokenizer=tokenizer if tokenizer.exists() else None,
        ) as engine:
            yield engine


def table(results: dict[str, dict[str, dict[str, float]]]) -> tuple[str, list[str]]:
    """Side-by-side table (sim/real ratios) and the list of out-of-tolerance cells."""
    lines = [f"{'workload':<10}{'metric':<18}{'vllm':>10}{'enginesim':>11}{'sim/real':>10}"]
    misses: list[str] = []
    real, sim = results.get("vllm", {}), results.get("enginesim", {})
    for level in (f"c{c}" for c in CONCURRENCIES):
        for metric in METRICS:
            r = real.get(level, {}).get(metric)
            s = sim.get(level, {}).get(metric)
            ratio = s / r if r and s is not None else None
            flag = ""
            if ratio is not None and abs(ratio - 1) > TOLERANCE:
                flag = "  <-- off by more than 25%"
                misses.append(f"{level} {metric}: {ratio:.2f}")
            lines.append(
                f"{level:<10}{metric:<18}{_fmt(r):>10}{_fmt(s):>11}"
                f"{(f'{ratio:.2f}' if ratio is not None else '-'):>10}{flag}"
            )
    return "\n".join(lines), misses


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="REAL_ENGINE_HOME")
    parser.add_argument("--engines", nargs="+", default=["vllm", "enginesim"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    home = args.home or Path(os.environ.get("REAL_ENGINE_HOME") or DEFAULT_HOME)

    prompts = workload(args.seed)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for kind in args.engines:
        started = time.perf_counter()
        with _engine(kind, home) as engine:
            print(f"{kind}: healthy after {time.perf_counter() - started:.1f} s")
            run = functools.partial(run_workload, engine.base_url, prompts, seed=args.seed)
            results[kind] = anyio.run(run)
    text, misses = table(results)
    print(text)
    if len(results) < 2:
        print("only one engine measured: no comparison")
    elif misses:
        print("outside 25%: " + "; ".join(misses))
    else:
        print("within 25% everywhere")
    doc: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": hardware(),
        "workload": {
            "requests": NUM_REQUESTS,
            "prompt_tokens": PROMPT_TOKENS,
            "output_tokens": OUTPUT_TOKENS,
            "concurrency": list(CONCURRENCIES),
            "seed": args.seed,
        },
        "results": results,
        "tolerance": TOLERANCE,
        "outside_tolerance": misses,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
