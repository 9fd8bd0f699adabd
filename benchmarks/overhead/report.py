"""Medians over rounds, the per-regime tables (rich), the targets, JSON and the PNG."""

from __future__ import annotations

import os
import platform
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.overhead.harness import median, ratio, spread
from benchmarks.overhead.runner import Cell

PEERS = ("vllm-router", "sglang-router")


def hardware() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "loadavg": os.getloadavg()}  # fmt: skip


def summarize(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One row per (regime, c, contender): medians over rounds, ratios to direct and peers."""
    groups: dict[tuple[str, int, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[(cell.regime, cell.c, cell.contender)].append(cell)
    rows: list[dict[str, Any]] = []
    for (reg, c, name), cs in groups.items():
        rows.append({
            "regime": reg, "c": c, "contender": name, "rounds": len(cs),
            "rps": median(x.rps for x in cs), "rps_spread": spread([x.rps for x in cs]),
            "p50_ms": median(x.p50_ms for x in cs), "p99_ms": median(x.p99_ms for x in cs),
            "cpu_us_per_req": median(x.cpu_us_per_req for x in cs),
            "cpu_spread": spread([x.cpu_us_per_req for x in cs]),
            "peak_rss_mb": max((x.peak_rss_mb for x in cs if x.peak_rss_mb), default=None),
            "errors": sum(x.errors for x in cs),
            "split": cs[-1].split, "streams_done": sum(x.streams_done for x in cs),
            "streams_cut": sum(x.streams_cut for x in cs),
            "ttft_p50_ms": median(x.ttft_p50_ms for x in cs),
            "ttft_checks": cs[-1].ttft_checks,
        })  # fmt: skip
    by_key = {(r["regime"], r["c"], r["contender"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["regime"], r["c"], "direct"))
        r["x_direct"] = ratio(r["rps"], base["rps"]) if base else None
        r["added_p50_ms"] = r["p50_ms"] - base["p50_ms"] if base else None
        r["added_ttft_ms"] = (r["ttft_p50_ms"] - base["ttft_p50_ms"]
                              if base and r["ttft_p50_ms"] is not None
                              and base["ttft_p50_ms"] is not None else None)  # fmt: skip
        for peer in PEERS:
            p = by_key.get((r["regime"], r["c"], peer))
            r[f"cpu_vs_{peer}"] = ratio(r["cpu_us_per_req"], p["cpu_us_per_req"]) if p else None
    rows.sort(key=lambda r: (r["regime"], r["c"], r["contender"] != "direct", r["contender"]))
    return rows


def targets(rows: Sequence[dict[str, Any]], soak: dict[str, Any] | None) -> dict[str, Any]:
    """Where the issue's targets are read (see README): e (prefix-cache vs rr), f (flat
    CPU/req over c), g (flat RSS)."""
    out: dict[str, Any] = {}
    e = {r["contender"]: r for r in rows if r["regime"] == "e"}
    rr, pc = e.get("switchyard-round-robin"), e.get("switchyard-prefix-cache")
    if rr and pc and rr["rps"]:
        cost = 1 - pc["rps"] / rr["rps"]
        out["e_prefix_cache_cost"] = {"value": cost, "target": "<= 0.10", "met": cost <= 0.10}
    f = [r for r in rows if r["regime"] == "f" and r["contender"] == "switchyard-round-robin"]
    cpus = [r["cpu_us_per_req"] for r in f if r["cpu_us_per_req"]]
    if cpus:
        mid = median(cpus) or 1.0
        dev = max(abs(v / mid - 1) for v in cpus)
        out["f_cpu_per_req_max_deviation"] = {"value": dev, "target": "<= 0.20", "met": dev <= 0.2}
    if soak and soak.get("rss_after_warmup_mb") and soak.get("rss_end_mb"):
        growth = soak["rss_end_mb"] / soak["rss_after_warmup_mb"] - 1
        out["g_rss_growth"] = {"value": growth, "target": "flat (<= 0.05)", "met": growth <= 0.05}
    return out


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_tables(console: Console, rows: Sequence[dict[str, Any]], titles: dict[str, str]) -> None:
    for reg in sorted({r["regime"] for r in rows}):
        sub = [r for r in rows if r["regime"] == reg]
        table = Table(title=f"({reg}) {titles.get(reg, '')}", title_justify="left")
        cols = [
            "contender",
            "c",
            "req/s",
            "x direct",
            "p50 ms",
            "p99 ms",
            "added p50",
            "CPU/req us",
            "/vllm-router",
            "/sglang-router",
            "peak RSS MB",
            "errors",
        ]
        if any(r["ttft_p50_ms"] is not None for r in sub):
            cols += ["TTFT p50 ms", "added TTFT"]
        for col in cols:
            table.add_column(col, justify="left" if col == "contender" else "right")
        for r in sub:
            cells = [
                r["contender"], str(r["c"]), _f(r["rps"]), _f(r["x_direct"], "{:.2f}"),
                _f(r["p50_ms"], "{:.2f}"), _f(r["p99_ms"], "{:.2f}"),
                _f(r["added_p50_ms"], "{:+.2f}"), _f(r["cpu_us_per_req"]),
                _f(r["cpu_vs_vllm-router"], "{:.2f}x"), _f(r["cpu_vs_sglang-router"], "{:.2f}x"),
                _f(r["peak_rss_mb"], "{:.0f}"),
                f"[red]{r['errors']}[/]" if r["errors"] else "0",
            ]  # fmt: skip
            if "TTFT p50 ms" in cols:
                cells += [_f(r["ttft_p50_ms"], "{:.2f}"), _f(r["added_ttft_ms"], "{:+.2f}")]
            table.add_row(*cells)
        console.print(table)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Sweep (regime f): req/s and p50 over c per contender; CPU/req per contender per c."""
    sweep = [r for r in rows if r["regime"] == "f"]
    if not sweep:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    palette = plt.get_cmap("tab10")
    for i, name in enumerate(sorted({r["contender"] for r in sweep})):
        pts = sorted(((r["c"], r) for r in sweep if r["contender"] == name), key=lambda t: t[0])
        cs = [c for c, _ in pts]
        style = {"marker": "o", "label": name, "color": palette(i % 10)}
        axes[0].plot(cs, [r["rps"] for _, r in pts], **style)
        axes[1].plot(cs, [r["p50_ms"] for _, r in pts], **style)
        cpu = [(c, r["cpu_us_per_req"]) for c, r in pts if r["cpu_us_per_req"]]
        if cpu:
            axes[2].plot([c for c, _ in cpu], [v for _, v in cpu], **style)
    for ax, title in zip(axes, ("req/s", "p50 latency (ms)", "proxy CPU per request (us)"),
                         strict=True):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (connections)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Gateway overhead: zero-delay fake engines (3), wrk")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
