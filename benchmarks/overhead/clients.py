"""Client-library comparison: which upstream client a Python gateway should use.

    python -m benchmarks.overhead.clients [--quick] [--rounds 3] [--duration 5]

The same minimal raw-ASGI reverse proxy (:mod:`.clients_proxy`, uvicorn + uvloop + httptools)
with its upstream via aiohttp or via tuned httpx, measured with wrk on zero-delay fake engines
at c=32 (non-stream) and on streaming (64 tokens at 1 ms, c=32), rounds interleaved; direct
as the baseline. Prints a table and writes ``results/clients.json``: req/s and the proxy's
CPU per request (its process group, during the timed run only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from benchmarks.overhead.contenders import Running, Starter, _ready
from benchmarks.overhead.procs import spawn
from benchmarks.overhead.regimes import CHAT, FULL, QUICK, STREAM64, Regime
from benchmarks.overhead.report import hardware, print_tables, summarize
from benchmarks.overhead.runner import cells_json, run_regime
from benchmarks.ports import free_ports

WORKLOADS = (
    Regime("c", "client comparison: zero-delay engines, c=32", 0, (32,), CHAT, tokens=64),
    Regime("d", "client comparison: streaming 64 tokens at 1 ms, c=32", 0, (32,), STREAM64,
           tokens=64),
)  # fmt: skip


def proxy(client: str) -> Starter:
    def start(engines: Sequence[str], logs: Path) -> Running:
        port = free_ports(1)[0]
        argv = [sys.executable, "-m", "benchmarks.overhead.clients_proxy", "--client", client,
                "--port", str(port), "--engines", ",".join(engines)]  # fmt: skip
        proc = spawn(f"asgi-{client}", argv, logs)
        return _ready(Running(f"asgi-{client}", f"http://127.0.0.1:{port}", proc), 30)

    return start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="aiohttp vs httpx as a proxy's upstream client")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("results/clients.json"))
    args = ap.parse_args(argv)
    base = QUICK if args.quick else replace(FULL, rounds=3, duration_s=5)
    preset = replace(base, rounds=args.rounds or base.rounds,
                     duration_s=args.duration or base.duration_s)  # fmt: skip
    console = Console() if sys.stdout.isatty() else Console(width=200)
    starters = {"asgi-aiohttp": proxy("aiohttp"), "asgi-httpx": proxy("httpx")}
    hw, cells, skipped, started = hardware(), [], {}, time.time()
    with tempfile.TemporaryDirectory(prefix="clients-") as tmp:
        for wl in WORKLOADS:
            got, skip = run_regime(wl, starters, preset, Path(tmp), console.print, lambda: None)
            cells += got
            skipped[wl.key] = skip
    rows = summarize(cells)
    print_tables(console, rows, {w.key: w.title for w in WORKLOADS})
    for key, skip in skipped.items():
        for name, why in skip.items():
            console.print(f"[yellow]({key}) skipped {name}: {why}[/]")
    hw["loadavg_after"] = hardware()["loadavg"]
    out = {"benchmark": "clients", "hardware": hw, "rounds": preset.rounds,
           "duration_s": preset.duration_s, "wall_s": time.time() - started,
           "cells": cells_json(cells), "medians": rows, "skipped": skipped}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
