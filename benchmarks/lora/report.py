"""The LoRA benchmark's table (rich), markdown table, target checks and JSON file.

JSON shape (the interface others rely on)::

    {"contenders": {NAME: {"ttft_p99_s": float, "loads": int, "tok_s": float, ...}},
     "targets": {...}, "targets_cold": {...}, "density": {...} | null, "config": {...},
     "host": {...}}

``targets`` are ``switchyard``'s, ``targets_cold`` the same checks for ``switchyard-cold``
(``{}`` where that contender or ``random-ondemand`` did not run).
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

__all__ = [
    "BASE",
    "OURS",
    "OURS_COLD",
    "check_targets",
    "markdown_table",
    "print_table",
    "write_json",
]

OURS = "switchyard"
OURS_COLD = "switchyard-cold"
BASE = "random-ondemand"
SPREAD_TARGET_S = 30.0
_COLUMNS = ("contender", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "tok/s", "loads", "unloads",
            "waited", "wait mean s", "failed", "hot spread s")  # fmt: skip


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _row(name: str, r: Mapping[str, Any]) -> list[str]:
    return [
        name,
        _f(r["ttft_p50_s"], ".3f"),
        _f(r["ttft_p99_s"], ".3f"),
        _f(r["itl_p50_s"] * 1000 if r["itl_p50_s"] is not None else None, ".1f"),
        _f(r["tok_s"], ".0f"),
        str(r["loads"]),
        str(r["unloads"]),
        str(r["waited"]),
        _f(r["wait_mean_s"], ".2f"),
        str(r["failed"]),
        _f(r["spread_max_s"], ".1f"),
    ]


def print_table(console: Console, rows: Mapping[str, Mapping[str, Any]], title: str) -> None:
    table = Table(title=title)
    for col in _COLUMNS:
        table.add_column(col, justify="left" if col == "contender" else "right")
    for name, r in rows.items():
        table.add_row(*_row(name, r))
    console.print(table)


def markdown_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_row(n, r)) + " |" for n, r in rows.items()]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else None


def check_targets(rows: Mapping[str, Mapping[str, Any]], *, ours: str = OURS) -> dict[str, Any]:
    """Issue 15's targets for ``ours`` (``switchyard`` or ``switchyard-cold``) against the
    baselines (``None`` where a side is missing; ``{}`` without ``ours`` or the base)."""
    if ours not in rows or BASE not in rows:
        return {}
    me, base = rows[ours], rows[BASE]
    ttft = _ratio(me["ttft_p99_s"], base["ttft_p99_s"])
    churn = _ratio(me["churn"], base["churn"])
    best_other = max((r["tok_s"] for n, r in rows.items() if n != ours), default=0.0)
    spread = me["spread_max_s"]
    return {
        "ttft_p99_vs_random": ttft,
        "ttft_p99_ok": ttft is not None and ttft <= 0.5,
        "churn_vs_random": churn,
        "churn_ok": churn is not None and churn <= 0.3,
        "tok_s_vs_best_other": _ratio(me["tok_s"], best_other),
        # Open loop: every contender is offered the same tokens; 1 % is run-to-run noise.
        "tok_s_ok": me["tok_s"] >= 0.99 * best_other,
        "spread_s": spread,
        "spread_ok": spread is not None and spread <= SPREAD_TARGET_S,
    }


def _host() -> dict[str, Any]:
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "load1": load1}  # fmt: skip


def _finite(v: Any) -> Any:
    """NaN/inf (no samples) become null: strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = _finite({**payload, "host": _host()})
    path.write_text(json.dumps(body, indent=2, default=str, allow_nan=False))
