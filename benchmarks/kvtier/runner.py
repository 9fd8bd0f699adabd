"""Runs one contender of the simulated KV-tier benchmark: engines, tier, gateway, load.

Per contender, fresh processes (every cache starts cold): a redis-server when the contender
uses the tier, ``python -m enginesim`` with ``engines`` engines of the (derived) profile
(``--kv-tier redis://...`` for tier contenders), ``switchyard serve`` with the contender's
routing policy (and the gateway's ``kv_tier`` settings for tier-aware routing, for tier
contenders), then the workload replayed open-loop through the gateway
(:func:`benchmarks.routing.loadgen.run_load`). The engines' ``/metrics`` are scraped before
and after for their prompt-token accounting (local compute, local hits, tier loads).

Times are simulated seconds: the client measures wall seconds and multiplies by ``speed``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.engine.measure import percentile
from benchmarks.kvtier.workload import KVTierWorkload
from benchmarks.ports import free_port_block
from benchmarks.routing import launch
from benchmarks.routing.loadgen import FixedTarget, Result, run_load
from benchmarks.routing.workloads import BenchRequest
from enginesim.core.profile import PROFILE_DIR

__all__ = [
    "CONTENDERS",
    "COUNTERS",
    "Contender",
    "RunConfig",
    "derived_profile",
    "run_contender",
    "scrape_counters",
    "start_gateway",
    "summarize_run",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    tier: bool
    policy: str


CONTENDERS: tuple[Contender, ...] = (
    Contender("no-tier-round-robin", tier=False, policy="round-robin"),
    Contender("no-tier-prefix-cache", tier=False, policy="prefix-cache"),
    Contender("tier-round-robin", tier=True, policy="round-robin"),
    Contender("tier-prefix-cache", tier=True, policy="prefix-cache"),
)

COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "prompt_tokens": ("vllm:prompt_tokens_total", {}),
    "local_compute": ("vllm:prompt_tokens_by_source_total", {"source": "local_compute"}),
    "local_cache_hit": ("vllm:prompt_tokens_by_source_total", {"source": "local_cache_hit"}),
    "tier_loaded": ("vllm:prompt_tokens_by_source_total", {"source": "external_kv_transfer"}),
    "external_queries": ("vllm:external_prefix_cache_queries_total", {}),
    "preemptions": ("vllm:num_preemptions_total", {}),
}
"""Engine counters summed over the engines (``name``: (sample, labels))."""


@dataclass(frozen=True, slots=True)
class RunConfig:
    workload: KVTierWorkload
    engines: int = 4
    profile: str = "llama3-8b-a10g"
    num_gpu_blocks: int | None = 1000
    speed: float = 2.0
    model: str = "llama3-8b"
    seed: int = 0
    drain_s: float = 180.0
    log_dir: Path = field(default_factory=lambda: Path("results/kvtier/logs"))
    tokenizer: Path | None = None
    block_tokens: int = 16
    tier_async: bool = True  # enginesim --kv-tier-async: loads beside the batch
    # The prefix-cache scorer's tier cost (s per token fetched): the profile's
    # kv_bytes_per_token / kv_tier_read_bytes_per_s. None: the scorer's default.
    tier_s_per_token: float | None = None


def derived_profile(
    base: str, num_gpu_blocks: int | None, out_dir: Path, *, vocab_size: int | None = None
) -> Path:
    """The profile JSON the engines run: ``base`` with ``num_gpu_blocks`` overridden (a
    smaller KV cache than the GPU would hold, so the working set does not fit) and, with
    ``vocab_size``, generated ids drawn from the benchmark tokenizer's vocabulary."""
    src = Path(base) if base.endswith(".json") else PROFILE_DIR / f"{base}.json"
    raw: dict[str, Any] = json.loads(src.read_text(encoding="utf-8"))
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
        raw["first_output_token_id"] = 4  # after the 3 ChatML specials and [UNK]
    if num_gpu_blocks is not None:
        raw["name"] = f"{raw['name']}-kv{num_gpu_blocks}"
        raw["num_gpu_blocks"] = num_gpu_blocks
        raw["notes"] = (
            f"{raw.get('notes', '')} Derived by benchmarks/kvtier: num_gpu_blocks "
            f"{num_gpu_blocks} (KV cache shrunk below the benchmark's working set)."
        ).strip()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{raw['name']}.json"
    path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return path


def start_gateway(
    *,
    policy: str,
    engine_urls: Sequence[str],
    model: str,
    log_dir: Path,
    extra: dict[str, Any],
    prefix: dict[str, Any],
    profiles: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> tuple[launch.Proc, str]:
    """``switchyard serve --config <yaml>`` in front of the engines; ``prefix``: the
    ``routing.prefix`` section (token mode), ``extra``: more top-level sections (the tier)."""
    port = free_port_block(1)
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "routing": {
            "policy": policy,
            "debug_header": True,  # x-switchyard-route: the decision, tier=N with the tier
            **({"prefix": prefix} if prefix else {}),
            **({"profiles": profiles} if profiles else {}),
        },
        "engines": [
            {"url": u, "id": f"e{i}", "models": [model]} for i, u in enumerate(engine_urls)
        ],
        "log_level": "WARNING",
        **extra,
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).parent / "switchyard"
    proc = launch.spawn("gateway", [str(exe), "serve", "--config", str(path)], log_dir)
    url = f"http://127.0.0.1:{port}"
    launch.wait_ready(proc, [f"{url}/health"], timeout_s=timeout_s)
    return proc, url


def scrape_counters(urls: Sequence[str]) -> dict[str, float]:
    """:data:`COUNTERS` summed over the engines at ``urls``."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    with httpx.Client(timeout=10.0) as client:
        for url in urls:
            text = client.get(f"{url}/metrics").text
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    for key, (name, labels) in COUNTERS.items():
                        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                            totals[key] += s.value
    return totals


def summarize_run(
    results: Sequence[Result],
    *,
    speed: float,
    counters: dict[str, float],
    measured: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Throughput (output tokens per simulated second over the measured requests' span, first
    send to last finish), TTFT mean and p99 (simulated seconds, measured requests that got a
    first token), errors and engine counters. ``measured[i]``: result ``i`` counts (after
    the warm-up); default all."""
    if measured is not None:
        results = [r for r, m in zip(results, measured, strict=True) if m]
    ok = [r for r in results if r.ok]
    ttfts = sorted(r.ttft_s * speed for r in ok if r.ttft_s is not None)
    finished = [r for r in ok if r.e2e_s is not None]
    throughput = 0.0
    if finished:
        span = max(r.sent_at + (r.e2e_s or 0.0) for r in finished) - min(r.sent_at for r in ok)
        tokens = sum(r.output_tokens for r in finished)
        throughput = tokens / (span * speed) if span > 0 else 0.0
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            kind = (r.error or f"status {r.status}").split(":")[0][:40]
            errors[kind] = errors.get(kind, 0) + 1
    prompt = counters.get("prompt_tokens", 0.0)
    return {
        "throughput_tok_s": throughput,
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else float("nan"),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "output_tokens": sum(r.output_tokens for r in finished),
        "engine": counters,
        "computed_fraction": counters.get("local_compute", 0.0) / prompt if prompt else None,
    }


def run_contender(
    cfg: RunConfig, contender: Contender, requests: Sequence[BenchRequest], profile: Path
) -> dict[str, Any]:
    """Start everything for ``contender``, replay ``requests``, stop everything."""
    log_dir = cfg.log_dir / contender.name
    procs: list[launch.Proc] = []
    try:
        extra: list[str] = ["--seed", str(cfg.seed)]
        if cfg.tokenizer is not None:
            extra += ["--tokenizer", str(cfg.tokenizer)]
        tier_cfg: dict[str, Any] | None = None
        if contender.tier:
            redis_proc, redis_url = launch.start_redis(log_dir=log_dir)
            procs.append(redis_proc)
            extra += ["--kv-tier", redis_url]
            if cfg.tier_async:
                extra.append("--kv-tier-async")
            tier_cfg = {"enabled": True, "redis_url": redis_url}  # tier-aware routing
        cluster = launch.start_enginesim(
            engines=cfg.engines,
            profile=str(profile),
            speed=cfg.speed,
            model=cfg.model,
            log_dir=log_dir,
            extra=extra,
        )
        procs.append(cluster.proc)
        policy, profiles = contender.policy, {}
        if tier_cfg and policy == "prefix-cache" and cfg.tier_s_per_token is not None:
            # The built-in prefix-cache policy with the tier's fetch cost per token.
            policy = "prefix-cache-tier"
            scorer = {"type": "prefix-cache", "tier_s_per_token": cfg.tier_s_per_token}
            profiles = {policy: {"scorers": [scorer]}}
        gw_proc, gw_url = start_gateway(
            policy=policy,
            profiles=profiles,
            engine_urls=cluster.urls,
            model=cfg.model,
            log_dir=log_dir,
            extra={"kv_tier": tier_cfg} if tier_cfg else {},
            prefix=(
                {"tokenizer": str(cfg.tokenizer), "block_tokens": cfg.block_tokens}
                if cfg.tokenizer is not None
                else {}
            ),
        )
        procs.append(gw_proc)
        before = scrape_counters(cluster.urls)
        max_wall = (cfg.workload.duration_s + cfg.drain_s) / cfg.speed
        results, info = anyio.run(
            partial(
                run_load,
                requests,
                FixedTarget(gw_url),
                model=cfg.model,
                speed=cfg.speed,
                max_duration_s=max_wall,
                request_timeout_s=max_wall,
            )
        )
        after = scrape_counters(cluster.urls)
        counters = {k: after[k] - before[k] for k in after}
        warm = cfg.workload.warmup_s
        measured = [req.at_s >= warm for req in requests]
        out = summarize_run(results, speed=cfg.speed, counters=counters, measured=measured)
        out["warmup_requests"] = measured.count(False)
        out["tier_aware_gateway"] = tier_cfg is not None
        out["load_info"] = info
        return out
    finally:
        for p in reversed(procs):
            p.stop()
