"""Run one small workload against the real vLLM engine and enginesim and compare them.

Run: ``make bench-engine`` (or ``.venv/bin/python -m benchmarks.engine.compare``). The workload:
8 requests of 300 random prompt tokens (unique, so no prefix hits) and 64 output tokens
(``ignore_eos``), streamed, at concurrency 1 and 4, on the base model and (when the random
adapter is installed) through a runtime-loaded LoRA adapter, after 2 warm-up requests. Both
engines get the same prompts. Engines run one after the other (2 shared cores): the real one
with the contract-suite flags (eager + LoRA, the configuration ``cpu-smollm2`` is calibrated
for), then ``enginesim --profile cpu-smollm2`` at speed 1.

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
from dataclasses import dataclass
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
from benchmarks.engine.measure import (
    SERVED_MODEL,
    engine_client,
    median,
    random_prompt,
    run_batch,
    stream_once,
)

LORA_NAME = "bench-lora"
RESULTS_PATH = REPO_ROOT / "results" / "engine_compare.json"
NUM_REQUESTS = 8
PROMPT_TOKENS = 300
OUTPUT_TOKENS = 64
CONCURRENCIES = (1, 4)
TOLERANCE = 0.25
METRICS = ("ttft_p50_ms", "itl_p50_ms", "output_tok_per_s")


@dataclass(frozen=True, slots=True)
class Level:
    """One row group of the table: a concurrency level, on the base model or via the adapter."""

    label: str
    concurrency: int
    lora: bool
    prompts: tuple[tuple[int, ...], ...]


def workload(seed: int, *, with_lora: bool) -> list[Level]:
    """The same prompts for every engine: per level, NUM_REQUESTS unique prompts."""
    rng = random.Random(seed)
    levels = []
    for lora in (False, True) if with_lora else (False,):
        for c in CONCURRENCIES:
            prompts = tuple(tuple(random_prompt(rng, PROMPT_TOKENS)) for _ in range(NUM_REQUESTS))
            levels.append(Level(f"c{c}" + ("-lora" if lora else ""), c, lora, prompts))
    return levels


async def run_workload(
    base_url: str, levels: Sequence[Level], *, seed: int, lora_path: Path | None
) -> dict[str, dict[str, float]]:
    rng = random.Random(seed + 1)
    out: dict[str, dict[str, float]] = {}
    async with engine_client(base_url) as client:
        if lora_path is not None:
            body = {"lora_name": LORA_NAME, "lora_path": str(lora_path)}
            resp = await client.post("/v1/load_lora_adapter", json=body)
            resp.raise_for_status()
        for _ in range(2):
            await stream_once(client, prompt=random_prompt(rng, PROMPT_TOKENS), max_tokens=8)
        for level in levels:
            model = LORA_NAME if level.lora else SERVED_MODEL
            timings, wall = await run_batch(
                client,
                level.prompts,
                max_tokens=OUTPUT_TOKENS,
                concurrency=level.concurrency,
                model=model,
            )
            tokens = sum(t.completion_tokens for t in timings)
            if tokens != NUM_REQUESTS * OUTPUT_TOKENS:
                raise RuntimeError(f"expected {NUM_REQUESTS * OUTPUT_TOKENS} tokens, got {tokens}")
            out[level.label] = {
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
    for level in dict.fromkeys([*real, *sim]):
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
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA levels")
    args = parser.parse_args(argv)
    home = args.home or Path(os.environ.get("REAL_ENGINE_HOME") or DEFAULT_HOME)

    lora_dir = RealEngineLayout.from_home(home).lora_dir
    lora_path = lora_dir if lora_dir.exists() and not args.no_lora else None
    levels = workload(args.seed, with_lora=lora_path is not None)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for kind in args.engines:
        started = time.perf_counter()
        with _engine(kind, home) as engine:
            print(f"{kind}: healthy after {time.perf_counter() - started:.1f} s")
            run = functools.partial(
                run_workload, engine.base_url, levels, seed=args.seed, lora_path=lora_path
            )
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
            "levels": [level.label for level in levels],
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
