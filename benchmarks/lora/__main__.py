"""``python -m benchmarks.lora [--quick] [--out FILE]``: high-density LoRA serving benchmark.

Four simulated A100 engines (enginesim, ``max_loras`` 8) serve 50 adapters of one base model
with Zipf popularity; arrivals are open-loop Poisson and the popularity ranking rotates
half-way so that cold adapters become the hot ones. Contenders: ``random-ondemand``,
``static``, ``least-request-ondemand`` (benchmark-side routers, straight to the engines),
``switchyard`` (the gateway's placement controller + LoRA-aware routing, preloading before
the trace: the default ``placement.preload``) and ``switchyard-cold`` (the same with
``placement.preload: false``).
Simulated time runs ``--speed`` times faster than wall time; everything is reported in
simulated seconds.
``--density`` adds the cost comparison (engines needed at the SLO vs one engine per
adapter). See benchmarks/lora/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from benchmarks.lora.density import DensityConfig, run_density
from benchmarks.lora.report import (
    OURS,
    OURS_COLD,
    check_targets,
    markdown_table,
    print_table,
    write_json,
)
from benchmarks.lora.runner import CONTENDERS, RunConfig, run_contender
from benchmarks.lora.traces import TraceConfig, make_trace


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__)
    p.add_argument("--quick", action="store_true", help="shorter trace, quick density (<15 min)")
    p.add_argument("--out", type=Path, default=Path("results/lora.json"))
    p.add_argument("--logs", type=Path, default=Path("results/lora-logs"))
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated names")
    p.add_argument("--speed", type=float, default=None, help="simulated s per wall s")
    p.add_argument("--rate", type=float, default=20.0, help="requests/s, all adapters")
    p.add_argument("--duration-s", type=float, default=None, help="simulated seconds")
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    density = p.add_mutually_exclusive_group()
    density.add_argument("--density", action="store_true", help="also run the density search")
    density.add_argument("--no-density", action="store_true", help="skip it (default: full run)")
    p.add_argument("--levels", default=None, help="density levels, e.g. low=10,high=40 (req/s)")
    p.add_argument("--density-speed", type=float, default=None, help="default: --speed's")
    p.add_argument("--density-duration-s", type=float, default=None, help="simulated s per probe")
    p.add_argument("--cap1", type=float, default=None,
                   help="known 1-adapter capacity at the SLO, req/s: no search")  # fmt: skip
    return p


def _density_cfg(args: argparse.Namespace, cfg: RunConfig) -> DensityConfig:
    d = DensityConfig.quick(cfg) if args.quick else DensityConfig.full(cfg)
    changes: dict[str, Any] = {"cap1": args.cap1}
    if args.density_speed:
        changes["speed"] = args.density_speed
    if args.levels:
        pairs = (item.split("=", 1) for item in args.levels.split(",") if item.strip())
        changes["levels"] = {name.strip(): float(rate) for name, rate in pairs}
    if args.density_duration_s:
        changes["duration_s"] = args.density_duration_s
    return dataclasses.replace(d, **changes)


def _configs(args: argparse.Namespace) -> RunConfig:
    duration = args.duration_s or (120.0 if args.quick else 300.0)
    speed = args.speed or (3.0 if args.quick else 2.0)
    trace = TraceConfig(rate=args.rate, duration_s=duration, n_adapters=args.adapters,
                        seed=args.seed)  # fmt: skip
    return RunConfig(log_dir=args.logs, trace=trace, engines=args.engines, speed=speed,
                     seed=args.seed)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]  # "" : density only
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        print(f"unknown contenders: {', '.join(unknown)} (known: {', '.join(CONTENDERS)})")
        return 2
    cfg = _configs(args)
    # A pipe or a log file gets the whole table, not 80 columns of ellipses.
    console = Console() if sys.stdout.isatty() else Console(width=150)
    total = len(make_trace(cfg.trace))
    rows: dict[str, dict[str, Any]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} requests"), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console) as bar:  # fmt: skip
        overall = bar.add_task("all contenders", total=total * len(names))
        for name in names:
            task = bar.add_task(name, total=total)
            done_before = bar.tasks[overall].completed

            def tick(sent: int, at_s: float, task: Any = task, base: float = done_before) -> None:
                del at_s
                bar.update(task, completed=sent)
                bar.update(overall, completed=base + sent)

            rows[name] = run_contender(name, cfg, progress=tick)
    title = (f"LoRA density: {cfg.engines} engines x {cfg.bench.max_loras} slots, "
             f"{cfg.trace.n_adapters} adapters, {cfg.trace.rate:g} req/s, "
             f"{cfg.trace.duration_s:g} simulated s (speed {cfg.speed:g})")  # fmt: skip
    if rows:
        print_table(console, rows, title)
    targets = check_targets(rows)
    targets_cold = check_targets(rows, ours=OURS_COLD)
    for name, checked in ((OURS, targets), (OURS_COLD, targets_cold)):
        if checked:
            console.print(name, checked)
    run_density_now = args.density or not (args.quick or args.no_density)
    density = None
    if run_density_now:
        density = run_density(_density_cfg(args, cfg), console=console)
    write_json(args.out, {
        "contenders": rows,
        "targets": targets,
        "targets_cold": targets_cold,
        "density": density,
        "markdown": markdown_table(rows),
        "config": {"argv": sys.argv[1:], "run": dataclasses.asdict(cfg)},
    })  # fmt: skip
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
