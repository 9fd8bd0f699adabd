"""``python -m benchmarks.routing`` (``make bench-routing``): the routing benchmark.

Prints a comparison table and writes JSON to ``results/routing-<mode>.json``. ``--quick``
(the default for ``make``) keeps every run short for a shared 2-core machine; ``--full`` uses
the llm-d-sized workloads (150 groups x 5 prompts of ~6,000-word system prompts) and a longer
ladder. See :mod:`benchmarks.routing.runner` for the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from benchmarks.routing import launch
from benchmarks.routing.report import (
    check_targets,
    compare_replicas,
    print_replicas,
    print_table,
    write_json,
)
from benchmarks.routing.runner import BenchConfig, run_benchmark
from benchmarks.routing.workloads import WORKLOADS

OURS = "inproc:prefix-cache"
GATEWAY = "gateway:prefix-cache"
REPLICAS = "gateway-2r:prefix-cache"
"""Two gateways sharing routing state through a redis-server, load spread round-robin."""
QUICK_KV_BLOCKS = 1024
"""Quick mode's KV capacity per engine: 1,024 x 16 = 16,384 tokens (see README, Workloads)."""
DEFAULT_CONTENDERS = (
    "inproc:random",
    "inproc:round-robin",
    "inproc:least-request",
    OURS,
    GATEWAY,
    REPLICAS,
    "sglang-router:cache_aware",
    "vllm-router:cache_aware",
    "oracle",
)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _kv_blocks(given: int | None, full: bool) -> int | None:
    if given is not None:
        return given or None
    return None if full else QUICK_KV_BLOCKS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short runs (default)")
    mode.add_argument("--full", action="store_true", help="llm-d-sized workloads, long ladder")
    p.add_argument("--workloads", type=_csv, default=None,
                   help="shared-prefix,multi-turn,unique,mix; also shared-prefix-zipf")  # fmt: skip
    p.add_argument("--contenders", type=_csv, default=None)
    p.add_argument("--fractions", type=_csv, default=None, help="load ladder, x saturation")
    p.add_argument("--speed", type=float, default=None, help="simulated s per wall s")
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat each step (order rotated); report medians and min-max")  # fmt: skip
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="GPU KV blocks per engine (quick: 1024; 0: the profile's)")  # fmt: skip
    p.add_argument("--probe-requests", type=int, default=None, help="requests per probe step")
    p.add_argument("--saturation", type=float, default=None,
                   help="skip the probe: saturation rate in simulated req/s")  # fmt: skip
    p.add_argument("--groups", type=int, default=None,
                   help="shared-prefix groups (overrides the preset's)")  # fmt: skip
    p.add_argument("--per-group", type=int, default=None,
                   help="shared-prefix requests per group (overrides the preset's)")  # fmt: skip
    p.add_argument("--sync-interval", type=float, default=None,
                   help="redis.sync_interval_s of gateway-<N>r replicas")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    full = bool(args.full)
    spec = WORKLOADS["full" if full else "quick"]
    sizes = {"groups": args.groups, "per_group": args.per_group}
    spec = dataclasses.replace(spec, **{k: v for k, v in sizes.items() if v is not None})
    cfg = BenchConfig(
        workloads=args.workloads or ("shared-prefix", "multi-turn", "unique", "mix"),
        contenders=args.contenders or DEFAULT_CONTENDERS,
        fractions=tuple(float(f) for f in args.fractions)
        if args.fractions
        else ((0.3, 0.5, 0.7, 0.9, 1.0) if full else (0.8,)),
        kv_blocks=_kv_blocks(args.kv_blocks, full),
        spec=spec,
        engines=args.engines,
        # 1.0: at 2x the shared 2-core host became the bottleneck on multi-turn (same run,
        # ours: TTFT p50 104 vs 69 ms, p90 295 vs 127 ms) and distorted every contender.
        speed=args.speed or 1.0,
        seed=args.seed,
        rounds=max(1, args.rounds),
        max_requests=args.max_requests or (750 if full else 512),
        probe_requests=args.probe_requests or (200 if full else 160),
        saturation_rps=args.saturation,
        max_run_wall_s=900.0 if full else 180.0,
        sync_interval_s=args.sync_interval,
    )
    missing = [c for c in cfg.contenders if c.split(":")[0] in launch.PEER_NAMES
               and not launch.peer_available(c.split(":")[0])]  # fmt: skip
    if missing:
        print(f"note: peers not installed ({', '.join(missing)}): run scripts/peers/install.sh")
    rows, meta = run_benchmark(cfg)
    print()
    print_table(rows)
    targets: list[dict[str, object]] = []
    for ours in (OURS, GATEWAY):
        for t in check_targets(rows, ours=ours):
            targets.append({"contender": ours, **t})
            mark = "MET " if t["met"] else "MISS"
            op = ">=" if t["at_least"] else "<="
            print(f"[{mark}] {ours} {t['workload']} @{t['load']:.2f}: {t['target']}: "
                  f"{t['value']:.3f} (limit {op} {t['limit']:.3f})")  # fmt: skip
    meta["targets"] = targets
    replicated = sorted({c for c in cfg.contenders if c.startswith("gateway-")})
    meta["replicas"] = [
        cmp for rep in replicated for cmp in compare_replicas(rows, single=GATEWAY, replicated=rep)
    ]
    print_replicas(meta["replicas"])
    out = args.out or Path(f"results/routing-{'full' if full else 'quick'}.json")
    write_json(out, rows=rows, meta=meta)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
