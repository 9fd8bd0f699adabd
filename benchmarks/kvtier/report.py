"""The KV-tier benchmark's table (rich), targets, JSON file and plot (matplotlib PNG).

JSON shape (the interface others rely on)::

    {"sim": {NAME: {"throughput_tok_s": float, "ttft_mean_s": float, "ttft_p99_s": float,
                    ...}},
     "targets": {...}, "config": {...}, "host": {...},
     "tier_throughput": {...}}          # kvcache's store part, when available

Targets (issue 13, from the AIBrix paper): the tier with the best routing against no tier
with the best routing -- throughput >= +50 % and mean TTFT <= 0.35x. "Best" = the contender of
each group with the lowest mean TTFT among those within 1 % of its group's best throughput
(below saturation every contender's throughput is the offered load, and TTFT decides).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["TARGET_THROUGHPUT_GAIN", "TARGET_TTFT_RATIO", "print_table", "targets", "write_json",
           "write_plot"]  # fmt: skip

TARGET_THROUGHPUT_GAIN = 0.5
TARGET_TTFT_RATIO = 0.35


THROUGHPUT_TIE = 0.01


def _best(rows: Mapping[str, Mapping[str, Any]], tier: bool) -> str | None:
    names = [n for n in rows if n.startswith("tier-") == tier]
    if not names:
        return None
    top = max(rows[n]["throughput_tok_s"] for n in names)
    close = [n for n in names if rows[n]["throughput_tok_s"] >= top * (1 - THROUGHPUT_TIE)]
    return min(close, key=lambda n: rows[n]["ttft_mean_s"])


def targets(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The tier's gain over no tier, best routing each side, against the issue's targets."""
    tier, base = _best(rows, True), _best(rows, False)
    if tier is None or base is None:
        return {"complete": False}
    t, b = rows[tier], rows[base]
    gain = t["throughput_tok_s"] / b["throughput_tok_s"] - 1 if b["throughput_tok_s"] else None
    ttft = t["ttft_mean_s"] / b["ttft_mean_s"] if b["ttft_mean_s"] else None
    p99 = t["ttft_p99_s"] / b["ttft_p99_s"] if b["ttft_p99_s"] else None
    return {
        "complete": True,
        "tier": tier,
        "no_tier": base,
        "throughput_gain": gain,
        "ttft_mean_ratio": ttft,
        "ttft_p99_ratio": p99,
        "throughput_met": gain is not None and gain >= TARGET_THROUGHPUT_GAIN,
        "ttft_met": ttft is not None and ttft <= TARGET_TTFT_RATIO,
    }


def _f(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def markdown_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The table as Markdown (docs/kvtier.md)."""
    head = ("| contender | throughput tok/s | TTFT mean s | TTFT p50 s | TTFT p99 s | ok / sent "
            "| prompt tokens computed | local hit | tier loaded |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for name, r in rows.items():
        e = r.get("engine", {})
        prompt = e.get("prompt_tokens") or 0.0

        def share(key: str, e: Mapping[str, Any] = e, prompt: float = prompt) -> str:
            return f"{e.get(key, 0.0) / prompt:.0%}" if prompt else "-"

        lines.append(
            f"| {name} | {_f(r['throughput_tok_s'], '.1f')} | {_f(r['ttft_mean_s'], '.2f')} | "
            f"{_f(r.get('ttft_p50_s'), '.2f')} | {_f(r['ttft_p99_s'], '.2f')} | "
            f"{r.get('ok', 0)} / {r.get('requests', 0)} | {share('local_compute')} | "
            f"{share('local_cache_hit')} | {share('tier_loaded')} |"
        )
    return "\n".join(lines)


def print_table(rows: Mapping[str, Mapping[str, Any]], tgt: Mapping[str, Any]) -> None:
    table = Table(title="KV tier, simulated (times in simulated seconds)")
    for col in ("contender", "tok/s", "TTFT mean", "TTFT p50", "TTFT p99", "ok/sent",
                "computed", "local hit", "tier"):  # fmt: skip
        table.add_column(col, justify="left" if col == "contender" else "right")
    for name, r in rows.items():
        e = r.get("engine", {})
        prompt = e.get("prompt_tokens") or 0.0
        shares = [f"{e.get(k, 0.0) / prompt:.0%}" if prompt else "-"
                  for k in ("local_compute", "local_cache_hit", "tier_loaded")]  # fmt: skip
        table.add_row(
            name,
            _f(r["throughput_tok_s"], ".1f"),
            _f(r["ttft_mean_s"], ".2f"),
            _f(r.get("ttft_p50_s"), ".2f"),
            _f(r["ttft_p99_s"], ".2f"),
            f"{r.get('ok', 0)}/{r.get('requests', 0)}",
            *shares,
        )
    console = Console()
    console.print(table)
    if tgt.get("complete"):
        console.print(
            f"{tgt['tier']} vs {tgt['no_tier']}: throughput {_f(tgt['throughput_gain'], '+.0%')} "
            f"(target >= +{TARGET_THROUGHPUT_GAIN:.0%}: "
            f"{'met' if tgt['throughput_met'] else 'NOT met'}), mean TTFT "
            f"{_f(tgt['ttft_mean_ratio'], '.2f')}x (target <= {TARGET_TTFT_RATIO}x: "
            f"{'met' if tgt['ttft_met'] else 'NOT met'}), p99 TTFT "
            f"{_f(tgt['ttft_p99_ratio'], '.2f')}x"
        )


def host_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}  # fmt: skip


def _clean(obj: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(dict(doc)), indent=2) + "\n", encoding="utf-8")


def write_plot(path: Path, rows: Mapping[str, Mapping[str, Any]]) -> Path:
    """Two bar panels: throughput and TTFT (mean and p99) per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colors = ["#999999" if not n.startswith("tier-") else "#1f77b4" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.bar(names, [rows[n]["throughput_tok_s"] for n in names], color=colors)
    ax1.set_ylabel("output tokens / simulated s")
    ax1.set_title("Throughput")
    x = range(len(names))
    means = [rows[n]["ttft_mean_s"] for n in names]
    p99s = [rows[n]["ttft_p99_s"] for n in names]
    ax2.bar([i - 0.2 for i in x], means, width=0.4, label="mean", color=colors)
    ax2.bar([i + 0.2 for i in x], p99s, width=0.4, label="p99", color=colors, alpha=0.5)
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("TTFT, simulated s")
    ax2.set_title("Time to first token (mean, p99 lighter)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
