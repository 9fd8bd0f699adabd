"""``python -m benchmarks.autoscale [--quick] [--out FILE]``: the autoscaling benchmark.

Closed loop, for real: load generator -> ``switchyard serve`` (Kubernetes discovery, the
contender's autoscaler embedded) -> enginesim pods run by ``switchyard kube-sim`` -> metrics
-> policy -> scale patch -> pods. Simulated time runs ``--speed`` times faster than wall time
(the emulator, the autoscaler's clock and interval, the arrivals); everything is reported in
simulated seconds. ``--quick`` runs the step trace only (the headline); the full run adds the
diurnal, bursty and prompt-mix traces. See benchmarks/autoscale/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from benchmarks.autoscale.cluster import DeploymentSpec, KubeSim
from benchmarks.autoscale.contenders import CONTENDERS, NAMES, Capacity, Contender
from benchmarks.autoscale.metrics import Slo
from benchmarks.autoscale.report import (
    markdown_table,
    print_table,
    ratios,
    write_json,
    write_plots,
)
from benchmarks.autoscale.runner import RunConfig, peak_replicas, run_contender, summarize
from benchmarks.autoscale.timing import timing_check
from benchmarks.autoscale.traces import TRACES, Trace, build_trace

HEADLINE = "step"
# Per-trace rates: the standard-size traces start at base_rps; the mix trace's short-heavy
# phase carries about the same prompt tokens/s as the step trace's base (README "Traces").
# Steps come after 240 s of base load: longer than a cold start plus the policies' settling,
# so every contender meets the step from its own steady state, not from the starting replica.
TRACE_KNOBS: dict[str, dict[str, float]] = {
    "step": {"duration_s": 720.0, "base_rps": 1.6, "step_at_s": 240.0, "step_end_s": 540.0},
    "diurnal": {"duration_s": 900.0, "base_rps": 2.6, "amplitude": 0.6},
    "bursty": {"duration_s": 900.0, "base_rps": 1.6, "burst_factor": 3.0},
    "mix": {"duration_s": 720.0, "base_rps": 4.2, "step_at_s": 240.0, "step_end_s": 540.0},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.autoscale", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the step trace only (~12 min)")
    p.add_argument("--out", type=Path, default=Path("results/autoscale.json"))
    p.add_argument("--plots", type=Path, default=None, help="PNG directory (default: --out's)")
    p.add_argument("--traces", default=None, help=f"comma-separated, of {','.join(TRACES)}")
    p.add_argument("--contenders", default=",".join(NAMES), help="comma-separated names")
    p.add_argument("--speed", type=float, default=8.0, help="simulated seconds per wall second")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=6)
    p.add_argument("--cold-start-s", type=float, default=120.0)
    p.add_argument("--ttft-slo-s", type=float, default=2.0)
    p.add_argument("--itl-slo-s", type=float, default=0.1)
    p.add_argument("--duration-scale", type=float, default=1.0, help="x every trace's length")
    p.add_argument("--logs", type=Path, default=Path("results/autoscale-logs"))
    p.add_argument("--no-timing-check", action="store_true")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="rerun a contended contender (emulator poll p99 over --contended-ms)",
    )
    p.add_argument("--contended-ms", type=float, default=50.0)
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="no retry that would end past this wall time (--quick: 840)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME.KEY=JSON",
        help="override a contender's policy setting, e.g. proactive.backlog_drain_s=120",
    )
    return p


def _contenders(overrides: list[str]) -> dict[str, Contender]:
    """CONTENDERS with ``--set NAME.KEY=JSON`` overrides applied."""
    out = dict(CONTENDERS)
    for item in overrides:
        key, _, raw = item.partition("=")
        name, _, setting = key.partition(".")
        if name not in out or not setting or not raw:
            raise SystemExit(f"--set {item!r}: want NAME.KEY=JSON with NAME a contender")
        c = out[name]
        out[name] = replace(c, settings={**c.settings, setting: json.loads(raw)})
    return out


def _traces(args: argparse.Namespace) -> dict[str, Trace]:
    names = (args.traces or (HEADLINE if args.quick else ",".join(TRACES))).split(",")
    built: dict[str, Trace] = {}
    for t in names:
        knobs = dict(TRACE_KNOBS[t]) if t in TRACE_KNOBS else {}
        for key in ("duration_s", "step_at_s", "step_end_s"):
            if key in knobs:
                knobs[key] *= args.duration_scale
        built[t] = build_trace(t, seed=args.seed, **knobs)
    return built


@dataclass(slots=True)
class _Session:
    """One benchmark invocation: the emulator, the traces, the contenders, the wall budget."""

    args: argparse.Namespace
    console: Console
    sim: KubeSim
    dep: DeploymentSpec
    cfg: RunConfig
    contenders: dict[str, Contender]
    names: list[str]
    order: list[tuple[str, Trace]]
    started: float = field(default_factory=time.perf_counter)

    def run_wall(self, trace: Trace) -> float:
        return trace.duration_s / self.cfg.speed + 10

    def remaining_s(self, ti: int, k: int) -> float:
        """Wall seconds the runs after contender ``k`` of trace ``ti`` still need."""
        here = (len(self.names) - k - 1) * self.run_wall(self.order[ti][1])
        return here + sum(len(self.names) * self.run_wall(tr) for _, tr in self.order[ti + 1 :])

    def run_one(self, ti: int, k: int) -> dict[str, Any]:
        """Contender ``k`` on trace ``ti``, rerun while contended and the budget allows."""
        args, (tname, trace), name = self.args, self.order[ti], self.names[k]
        budget = args.budget_s or (780.0 if args.quick else float("inf"))
        row: dict[str, Any] = {}
        for attempt in range(max(0, args.retries) + 1):
            run = run_contender(
                self.contenders[name], trace, sim=self.sim, dep=self.dep, cfg=self.cfg,
                log_dir=args.logs, salt=f"salt{tname}{k}x",
            )  # fmt: skip
            row = summarize(run, trace, self.cfg) | {"attempt": attempt + 1}
            p99 = row["cpu_cores"].get("emulator_poll_p99_ms") or 0.0
            row["contended"] = p99 > args.contended_ms
            left = budget - (time.perf_counter() - self.started) - self.remaining_s(ti, k)
            if not row["contended"] or left < self.run_wall(trace):
                break
            load = row["cpu_cores"].get("host_load_1m")
            self.console.print(
                f"{tname} {name}: contended (emulator poll p99 {p99:.0f} ms, host load {load})"
            )
        self.console.print(
            f"{tname} {name}: att {row['slo_attainment']:.3f} gpu-h {row['gpu_hours']:.3f}"
            f" rev {row['reversals']} first {row['first_decision_s']} cpu {row['cpu_cores']}"
            f" errors {row['errors']} wall {row['wall_s']:.0f}s"
        )
        return row

    def run_all(self, doc: dict[str, Any], progress: Progress, task: TaskID) -> None:
        for ti, (tname, trace) in enumerate(self.order):
            rows: dict[str, Any] = {}
            for k, name in enumerate(self.names):
                progress.update(task, description=f"{tname}: {name}")
                rows[name] = self.run_one(ti, k)
                progress.advance(task, self.run_wall(trace))
                partial = {**doc, "partial": True}
                partial["traces"] = {**doc["traces"], tname: {"contenders": rows}}
                write_json(self.args.out, partial)
            for name in rows:
                if name in ("proactive", "slo"):
                    rows[name]["ratios"] = ratios(rows, name)
            doc["traces"][tname] = {"contenders": rows, "trace": _trace_doc(trace, self.cfg)}
            print_table(self.console, tname, rows)
            self.console.print(markdown_table(rows), markup=False, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    contenders = _contenders(args.set)
    names = [n for n in args.contenders.split(",") if n]
    traces = (args.traces or (HEADLINE if args.quick else ",".join(TRACES))).split(",")
    unknown = [n for n in names if n not in CONTENDERS] + [t for t in traces if t not in TRACES]
    if unknown:
        console.print(f"unknown: {unknown}")
        return 2
    names = sorted(names, key=lambda n: 0 if contenders[n].static else 1)  # warm peak first
    slo = Slo(ttft_s=args.ttft_slo_s, itl_s=args.itl_slo_s)
    cfg = RunConfig(speed=args.speed, slo=slo, capacity=Capacity(cold_start_s=args.cold_start_s),
                    min_replicas=args.min_replicas, max_replicas=args.max_replicas)  # fmt: skip
    dep = DeploymentSpec(cold_start_s=args.cold_start_s)
    order = list(_traces(args).items())
    doc: dict[str, Any] = {"config": _config(args, cfg, dep), "traces": {}}
    with KubeSim(speed=args.speed, log_dir=args.logs) as sim, Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console,
    ) as progress:  # fmt: skip
        session = _Session(args, console, sim, dep, cfg, contenders, names, order)
        task = progress.add_task("starting", total=sum(
            session.run_wall(tr) * len(names) for _, tr in order))  # fmt: skip
        start = peak_replicas(order[0][1], cfg) if contenders[names[0]].static else 1
        sim.create(dep, start)
        sim.wait_settled(dep, start, timeout_s=args.cold_start_s / args.speed + 120)
        if not args.no_timing_check:
            progress.update(task, description="timing check")
            doc["timing_check"] = _timing(sim, dep, args.speed)
            console.print(f"timing check: {doc['timing_check']}")
        session.run_all(doc, progress, task)
    headline = HEADLINE if HEADLINE in doc["traces"] else order[0][0]
    doc["headline_trace"] = headline
    doc["contenders"] = doc["traces"][headline]["contenders"]
    doc["wall_s"] = time.perf_counter() - session.started
    write_json(args.out, doc)
    plots = write_plots(args.plots or args.out.parent, doc["traces"])
    console.print(f"wrote {args.out} and {', '.join(str(p) for p in plots)}; "
                  f"wall {doc['wall_s']:.0f} s")  # fmt: skip
    return 0


def _timing(sim: KubeSim, dep: DeploymentSpec, speed: float) -> dict[str, Any]:
    state = sim.state()
    urls = [p["engine"] for p in state["pods"] if p["ready"] and p["engine"]]
    if not urls:
        return {"error": "no ready pod"}
    return timing_check(urls[0], profile=dep.profile, speed=speed)


def _trace_doc(trace: Trace, cfg: RunConfig) -> dict[str, Any]:
    return {
        "name": trace.name,
        "seed": trace.seed,
        "duration_s": trace.duration_s,
        "requests": len(trace.requests),
        "load_steps": list(trace.load_steps),
        "peak_replicas": peak_replicas(trace, cfg),
        "segments": [[round(s, 2), round(r, 4)] for s, r in trace.segments],
        "spec": {k: getattr(trace.spec, k) for k in trace.spec.__dataclass_fields__},
    }


def _git() -> dict[str, str]:
    """The commit the run used and any uncommitted changes under autoscale/ and gateway/
    (the gateway subprocesses import the working tree)."""

    def run(*argv: str) -> str:
        try:
            out = subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip()

    return {"commit": run("rev-parse", "--short", "HEAD"),
            "dirty": run("status", "--short", "--", "autoscale", "gateway")}  # fmt: skip


def _config(args: argparse.Namespace, cfg: RunConfig, dep: DeploymentSpec) -> dict[str, Any]:
    return {
        "argv": sys.argv[1:],
        "overrides": list(args.set),
        "git": _git(),
        "speed": cfg.speed,
        "slo": {"ttft_s": cfg.slo.ttft_s, "itl_s": cfg.slo.itl_s},
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "grace_s": cfg.grace_s,
        "ttft_timeout_s": cfg.ttft_timeout_s,
        "capacity": {k: getattr(cfg.capacity, k) for k in cfg.capacity.__dataclass_fields__},
        "deployment": {k: getattr(dep, k) for k in dep.__dataclass_fields__},
        "gpu_hours_per_pod_second": 1 / 3600,
    }


if __name__ == "__main__":
    sys.exit(main())
