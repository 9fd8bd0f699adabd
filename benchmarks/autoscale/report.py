"""The autoscaling benchmark's table (rich), JSON file and plots (matplotlib PNG).

JSON shape (the interface others rely on)::

    {"contenders": {NAME: {"slo_attainment": 0..1, "gpu_hours": float, "reversals": int,
                           "first_decision_s": float | null, ...}},   # the headline trace
     "traces": {TRACE: {"contenders": {...}, "trace": {...}}}, "config": {...}, "host": {...}}
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = [
    "RATIO_BASES",
    "markdown_table",
    "print_table",
    "ratios",
    "write_json",
    "write_plots",
]

RATIO_BASES = ("hpa-waiting", "kpa", "apa")
OURS = ("proactive", "slo")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def ratios(rows: Mapping[str, Mapping[str, Any]], name: str) -> dict[str, dict[str, float | None]]:
    """``name``'s GPU-hours and reversals over each base's (None where the base has none)."""
    out: dict[str, dict[str, float | None]] = {}
    me = rows[name]
    for base in RATIO_BASES:
        if base not in rows or base == name:
            continue
        b = rows[base]
        out[base] = {
            "gpu_hours": me["gpu_hours"] / b["gpu_hours"] if b["gpu_hours"] else None,
            "reversals": me["reversals"] / b["reversals"] if b["reversals"] else None,
            "slo_attainment_delta": me["slo_attainment"] - b["slo_attainment"],
        }
    return out


def print_table(console: Console, trace: str, rows: Mapping[str, Mapping[str, Any]]) -> None:
    table = Table(title=f"autoscaling, trace {trace} (simulated seconds)")
    for col in ("contender", "SLO att.", "att. where cap.", "TTFT p99 s", "GPU-h",
                "events", "reversals", "1st decision s", "ready cap. s", "max repl.",
                "GPU-h x hpa-w/kpa/apa", "host load", "emu p99 ms"):  # fmt: skip
        table.add_column(col, justify="left" if col == "contender" else "right")
    for name, r in rows.items():
        rat = ratios(rows, name)
        gpu = "/".join(_fmt((rat.get(b) or {}).get("gpu_hours"), ".2f") for b in RATIO_BASES)
        table.add_row(
            name + (" *" if r.get("contended") else ""),
            _fmt(r["slo_attainment"], ".1%"),
            _fmt(r["slo_attainment_capacity"], ".1%"),
            _fmt(r["ttft_p99_s"], ".2f"),
            _fmt(r["gpu_hours"], ".3f"),
            str(r["scale_events"]),
            str(r["reversals"]),
            _fmt(r["first_decision_s"], ".1f"),
            _fmt(r["ready_capacity_s"], ".1f"),
            str(r["max_replicas"]),
            gpu,
            _fmt(r["cpu_cores"].get("host_load_1m"), ".1f"),
            _fmt(r["cpu_cores"].get("emulator_poll_p99_ms"), ".0f"),
        )
    console.print(table)


def markdown_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The table as Markdown (the README's results section)."""
    head = ("| contender | SLO att. | where capacity allows | TTFT p99 s | GPU-h | scale events "
            "| reversals | first decision s | ready capacity s | max replicas "
            "| GPU-h x hpa-waiting / kpa / apa | host load | emulator poll p99 ms |")  # fmt: skip
    lines = [head, "|" + "---|" * 13]
    for name, r in rows.items():
        rat = ratios(rows, name)
        gpu = " / ".join(_fmt((rat.get(b) or {}).get("gpu_hours"), ".2f") for b in RATIO_BASES)
        mark = " *" if r.get("contended") else ""
        cells = [name + mark, _fmt(r["slo_attainment"], ".1%"),
                 _fmt(r["slo_attainment_capacity"], ".1%"),
                 _fmt(r["ttft_p99_s"], ".2f"), _fmt(r["gpu_hours"], ".3f"), str(r["scale_events"]),
                 str(r["reversals"]), _fmt(r["first_decision_s"], ".1f"),
                 _fmt(r["ready_capacity_s"], ".1f"), str(r["max_replicas"]), gpu,
                 _fmt(r["cpu_cores"].get("host_load_1m"), ".1f"),
                 _fmt(r["cpu_cores"].get("emulator_poll_p99_ms"), ".0f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    doc = {**doc, "host": {"nproc": os.cpu_count(), "machine": platform.machine(),
                           "python": platform.python_version()}}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))


def write_plots(out_dir: Path, traces: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Per trace: replicas (desired dashed, ready solid) and offered load over time per
    contender; over all traces: SLO attainment against GPU-hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for trace, doc in traces.items():
        rows = doc["contenders"]
        n = len(rows)
        fig, axes = plt.subplots(n, 1, figsize=(9, 1.9 * n + 0.6), sharex=True, squeeze=False)
        segs = doc["trace"]["segments"]
        for ax, (name, r) in zip(axes[:, 0], rows.items(), strict=True):
            tl = r["timeline"]
            ts = [p[0] for p in tl]
            ax.step(ts, [p[1] for p in tl], where="post", ls="--", color="C0", label="desired")
            ax.step(ts, [p[2] for p in tl], where="post", color="C0", label="ready")
            ax.set_ylabel(name, fontsize=8)
            load = ax.twinx()
            xs = [s[0] for s in segs] + [doc["trace"]["duration_s"]]
            ys = [s[1] for s in segs] + [segs[-1][1]]
            load.step(xs, ys, where="post", color="C3", alpha=0.5)
            load.set_ylabel("req/s", fontsize=7, color="C3")
            ax.set_ylim(0, max(2, r["max_replicas"]) + 1)
        axes[0, 0].legend(loc="upper left", fontsize=7)
        axes[-1, 0].set_xlabel("simulated seconds")
        fig.suptitle(f"replicas (blue) and offered load (red), trace {trace}")
        fig.tight_layout()
        path = out_dir / f"autoscale-{trace}-replicas.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, (trace, doc) in enumerate(traces.items()):
        for name, r in doc["contenders"].items():
            ax.scatter(r["gpu_hours"], r["slo_attainment"], color=f"C{k}",
                       marker="*" if name in ("proactive", "slo") else "o")  # fmt: skip
            ax.annotate(name, (r["gpu_hours"], r["slo_attainment"]), fontsize=7)
        ax.scatter([], [], color=f"C{k}", label=trace)
    ax.set_xlabel("GPU-hours (simulated)")
    ax.set_ylabel("SLO attainment")
    ax.legend(fontsize=8)
    ax.set_title("SLO attainment vs GPU-hours (stars: ours)")
    fig.tight_layout()
    path = out_dir / "autoscale-slo-vs-gpu-hours.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written
