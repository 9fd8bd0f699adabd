"""Gateway overhead benchmark (issue 10): Switchyard vs direct, nginx, sglang-router,
vllm-router and LiteLLM in front of lean fake engines, driven by wrk.

    python -m benchmarks.overhead [--quick] [--regimes abcdefg] [--rounds 5]
        [--contenders nginx,vllm-router,...] [--before-rev REV] [--out results/overhead.json]

Prints a table per regime, writes JSON (hardware, every round's values, medians, targets) and
a PNG of the concurrency sweep. See benchmarks/overhead/README.md for the method.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from benchmarks.overhead import contenders as cont
from benchmarks.overhead.load import write_prompt_bodies
from benchmarks.overhead.procs import LaunchError
from benchmarks.overhead.regimes import FULL, QUICK, REGIMES, SOAK_KEY, Regime, with_sweep
from benchmarks.overhead.report import hardware, plot, print_tables, summarize, targets
from benchmarks.overhead.runner import Cell, cells_json, run_regime, soak


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="gateway overhead benchmark (issue 10)")
    ap.add_argument("--quick", action="store_true", help="smoke preset: 1 round, 2 s cells")
    ap.add_argument("--regimes", default="abcdefg", help="subset of a..g")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="seconds per timed wrk run")
    ap.add_argument("--contenders", default="", help="comma list (default: all); direct always")
    ap.add_argument("--policies", default="round-robin", help="Switchyard policies, comma list")
    ap.add_argument("--before-rev", default=None, help="also run Switchyard at this git revision")
    ap.add_argument("--soak-requests", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("results/overhead.json"))
    return ap.parse_args(argv)


def _starters(
    regime: Regime, catalogue: dict[str, cont.Starter], wanted: set[str]
) -> dict[str, cont.Starter]:
    extra = {n: cont.switchyard(n.removeprefix("switchyard-")) for n in regime.extra}
    out = {**catalogue, **{n: s for n, s in extra.items() if n not in catalogue}}
    return {
        n: s
        for n, s in out.items()
        if n not in regime.exclude and (not wanted or n in wanted or n in regime.extra)
    }


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    preset = QUICK if args.quick else FULL
    preset = replace(
        preset,
        rounds=args.rounds or preset.rounds,
        duration_s=args.duration or preset.duration_s,
        soak_requests=args.soak_requests or preset.soak_requests,
    )
    keys = [k for k in args.regimes if k in REGIMES or k == SOAK_KEY]
    wanted = {n.strip() for n in args.contenders.split(",") if n.strip()}
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    catalogue = cont.catalogue(policies, args.before_rev)
    regimes = [with_sweep(REGIMES[k], preset) for k in keys if k in REGIMES]
    plan = {r.key: _starters(r, catalogue, wanted) for r in regimes}
    total = sum(preset.rounds * len(r.concurrency) * (1 + len(plan[r.key])) for r in regimes)
    seg = max(1, int(preset.soak_requests / 2000 / preset.soak_segment_s))  # guess at 2k req/s
    total += seg if SOAK_KEY in keys else 0
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10).stdout.strip()  # fmt: skip
    hw = hardware()
    console.print(f"[bold]overhead benchmark[/] commit {commit[:12]} regimes {''.join(keys)} "
                  f"rounds {preset.rounds} x {preset.duration_s:g} s; {hw['nproc']} CPUs "
                  f"({hw['cpu_model']}), load {hw['loadavg']}")  # fmt: skip
    cells: list[Cell] = []
    skipped: dict[str, dict[str, str]] = {}
    soak_result: dict[str, Any] | None = None
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp, Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    ) as progress:  # fmt: skip
        logs = Path(tmp)
        task = progress.add_task("cells", total=total)

        def advance() -> None:
            progress.advance(task)

        bodies = write_prompt_bodies(logs / "prompts.jsonl") if "e" in keys else None
        for regime in regimes:
            progress.update(task, description=f"({regime.key}) {regime.title[:40]}")
            got, skip = run_regime(regime, plan[regime.key], preset, logs, progress.console.print,
                                   advance, bodies=bodies)  # fmt: skip
            cells += got
            skipped[regime.key] = skip
        if SOAK_KEY in keys:
            progress.update(task, description="(g) soak: RSS over requests")
            try:
                soak_result = soak(catalogue["switchyard-round-robin"], preset, logs,
                                   progress.console.print, advance, REGIMES["c"])  # fmt: skip
            except (cont.Skip, LaunchError) as exc:
                skipped[SOAK_KEY] = {"switchyard-round-robin": str(exc).splitlines()[0]}
            progress.update(task, completed=total)
    rows = summarize(cells)
    titles = {r.key: r.title for r in regimes}
    print_tables(console, rows, titles)
    tgt = targets(rows, soak_result)
    if soak_result:
        console.print(f"(g) soak: {soak_result['requests']:,} requests; RSS after warm-up "
                      f"{soak_result['rss_after_warmup_mb'] or 0:.1f} MB, at the end "
                      f"{soak_result['rss_end_mb'] or 0:.1f} MB")  # fmt: skip
    for name, t in tgt.items():
        console.print(f"target {name}: {t['value']:.3f} (target {t['target']}): "
                      + ("[green]met[/]" if t["met"] else "[red]not met[/]"))  # fmt: skip
    for reg, skip in skipped.items():
        for name, why in skip.items():
            console.print(f"[yellow]({reg}) skipped {name}: {why}[/]")
    hw["loadavg_after"] = hardware()["loadavg"]
    result = {
        "benchmark": "overhead", "commit": commit, "hardware": hw,
        "preset": {"quick": args.quick, **asdict(preset)},
        "started": started, "wall_s": time.time() - started,
        "regimes": {r.key: r.title for r in regimes}, "cells": cells_json(cells),
        "medians": rows, "soak": soak_result, "targets": tgt, "skipped": skipped,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    png = plot(rows, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
