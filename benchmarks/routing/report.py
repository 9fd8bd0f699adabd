"""Summaries of one benchmark run, the comparison table, target checks and the JSON file.

All latencies are reported in *simulated* seconds (wall x speed), the unit the engine profile
(Llama-3-8B on A100) is calibrated in. Engine-side numbers come from ``/metrics`` deltas over
the run: prefix-cache hit rate = delta hits / delta queries (tokens) summed over engines; the
load split is each engine's share of finished requests.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.routing.loadgen import Result
from routing.metrics_parser import EngineMetrics

__all__ = [
    "RunSummary",
    "check_targets",
    "compare_replicas",
    "pct",
    "print_replicas",
    "print_table",
    "summarize",
    "write_json",
]


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class RunSummary:
    workload: str
    contender: str
    rate_rps: float
    fraction: float
    requests: int
    ok: int
    errors: dict[str, int]
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    output_tok_per_s: float | None
    engine_hit_rate: float | None
    load_split: list[float]
    load_split_max_dev: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def _error_kind(error: str) -> str:
    return error.split(":")[0][:40]


def summarize(
    *,
    workload: str,
    contender: str,
    rate_rps: float,
    fraction: float,
    results: Sequence[Result],
    speed: float,
    before: Mapping[str, EngineMetrics],
    after: Mapping[str, EngineMetrics],
    extra: dict[str, Any] | None = None,
) -> RunSummary:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            kind = _error_kind(r.error or f"status {r.status}")
            errors[kind] = errors.get(kind, 0) + 1
    ttfts = [r.ttft_s * speed for r in ok if r.ttft_s is not None]
    itls = [gap * speed for r in ok for gap in r.itls_s]
    finished = [r for r in ok if r.e2e_s is not None]
    tps: float | None = None
    if finished:
        span = max(r.sent_at + (r.e2e_s or 0.0) for r in finished) - min(r.sent_at for r in ok)
        tokens = sum(r.output_tokens for r in finished)
        tps = tokens / (span * speed) if span > 0 else None
    hits = sum(after[e].prefix_hits - before[e].prefix_hits for e in after if e in before)
    queries = sum(after[e].prefix_queries - before[e].prefix_queries for e in after if e in before)
    done = [after[e].requests_finished - before[e].requests_finished for e in sorted(after)]
    total_done = sum(done)
    split = [d / total_done for d in done] if total_done > 0 else []
    dev = max(abs(s * len(split) - 1.0) for s in split) if split else None
    return RunSummary(
        workload=workload,
        contender=contender,
        rate_rps=rate_rps,
        fraction=fraction,
        requests=len(results),
        ok=len(ok),
        errors=errors,
        ttft_p50_s=pct(ttfts, 50),
        ttft_p90_s=pct(ttfts, 90),
        ttft_p99_s=pct(ttfts, 99),
        itl_p50_s=pct(itls, 50),
        output_tok_per_s=tps,
        engine_hit_rate=hits / queries if queries > 0 else None,
        load_split=split,
        load_split_max_dev=dev,
        extra=extra or {},
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_table(rows: Sequence[RunSummary]) -> None:
    header = (
        f"{'workload':<14}{'load':>6}{'rps':>7} {'contender':<30}{'ok':>6}"
        f"{'ttft50':>8}{'ttft90':>8}{'p90 min-max':>14}{'ttft99':>8}{'itl50':>7}{'tok/s':>9}"
        f"{'hit':>6}{'cpu/req':>8}  split"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        split = "/".join(f"{s * 100:.0f}" for s in r.load_split) or "-"
        lo_hi = r.extra.get("spread", {}).get("ttft_p90_s")
        p90_range = f"{lo_hi[0] * 1e3:.0f}-{lo_hi[1] * 1e3:.0f}" if lo_hi else "-"
        cpu = r.extra.get("router_cpu_s")
        cpu_req = f"{cpu / r.ok * 1e3:.2f}" if cpu is not None and r.ok else "-"
        print(
            f"{r.workload:<14}{r.fraction:>6.2f}{r.rate_rps:>7.2f} {r.contender:<30}"
            f"{r.ok:>3}/{r.requests:<3}{_ms(r.ttft_p50_s):>7}{_ms(r.ttft_p90_s):>8}"
            f"{p90_range:>14}{_ms(r.ttft_p99_s):>8}{_ms(r.itl_p50_s):>7}"
            f"{_num(r.output_tok_per_s, '{:.0f}'):>9}"
            f"{_num(r.engine_hit_rate):>6}{cpu_req:>8}  {split}"
        )
    print(
        "(latencies in simulated ms; medians over rounds, p90 min-max = spread over rounds;"
        " hit = engine-reported prefix-cache hit rate; cpu/req = the router process's CPU ms"
        " per request during the load, separate-process contenders only)"
    )


def check_targets(rows: Sequence[RunSummary], *, ours: str) -> list[dict[str, Any]]:
    """The issue's targets, per (workload, load) where the needed contenders ran."""
    out: list[dict[str, Any]] = []
    by_key: dict[tuple[str, float], dict[str, RunSummary]] = {}
    for r in rows:
        by_key.setdefault((r.workload, r.fraction), {})[r.contender] = r
    for (workload, frac), runs in sorted(by_key.items()):
        mine = runs.get(ours)
        if mine is None or mine.ttft_p90_s is None:
            continue
        peer_runs = [r for n, r in runs.items() if n.startswith(("sglang-router", "vllm-router"))]
        if workload in ("shared-prefix", "multi-turn") and frac >= 0.7:
            rr = runs.get("inproc:round-robin") or runs.get("gateway:round-robin")
            peers = [r.ttft_p90_s for r in peer_runs if r.ttft_p90_s is not None]
            if rr and rr.ttft_p90_s:
                out.append(_target(workload, frac, "p90 <= 0.5x round-robin",
                                   mine.ttft_p90_s, 0.5 * rr.ttft_p90_s))  # fmt: skip
            if peers:
                out.append(_target(workload, frac, "p90 <= 0.8x better peer",
                                   mine.ttft_p90_s, 0.8 * min(peers)))  # fmt: skip
            peer_tps = [r.output_tok_per_s for r in peer_runs if r.output_tok_per_s is not None]
            if peer_tps and mine.output_tok_per_s is not None:
                out.append(_target(workload, frac, "output tok/s >= every peer",
                                   mine.output_tok_per_s, max(peer_tps),
                                   at_least=True))  # fmt: skip
        if workload in ("shared-prefix", "multi-turn"):
            orc = runs.get("oracle")
            if orc and orc.engine_hit_rate and mine.engine_hit_rate is not None:
                out.append(_target(workload, frac, "hit rate within 10% of oracle",
                                   mine.engine_hit_rate, 0.9 * orc.engine_hit_rate,
                                   at_least=True))  # fmt: skip
        if workload == "unique":
            lr = runs.get("inproc:least-request") or runs.get("gateway:least-request")
            if lr and lr.ttft_p90_s:
                out.append(_target(workload, frac, "p90 within 5% of least-request",
                                   mine.ttft_p90_s, 1.05 * lr.ttft_p90_s))  # fmt: skip
            if lr and lr.output_tok_per_s and mine.output_tok_per_s is not None:
                out.append(_target(workload, frac, "tok/s within 5% of least-request",
                                   mine.output_tok_per_s, 0.95 * lr.output_tok_per_s,
                                   at_least=True))  # fmt: skip
            if mine.load_split_max_dev is not None:
                out.append(_target(workload, frac, "load split within +-10%",
                                   mine.load_split_max_dev, 0.10))  # fmt: skip
    return out


def compare_replicas(
    rows: Sequence[RunSummary], *, single: str, replicated: str
) -> list[dict[str, Any]]:
    """Replicas sharing routing state against one gateway, per (workload, load) where both
    ran: engine hit rates and load splits side by side, and the issue's targets -- a hit
    rate at least 0.9x one gateway's, and a load split as even (its largest deviation from
    an even share at most 0.10 above one gateway's). Both compare medians over rounds."""
    out: list[dict[str, Any]] = []
    by_key: dict[tuple[str, float], dict[str, RunSummary]] = {}
    for r in rows:
        by_key.setdefault((r.workload, r.fraction), {})[r.contender] = r
    for (workload, frac), runs in sorted(by_key.items()):
        one, many = runs.get(single), runs.get(replicated)
        if one is None or many is None:
            continue
        targets = []
        if one.engine_hit_rate and many.engine_hit_rate is not None:
            targets.append(_target(workload, frac, "hit rate >= 0.9x one gateway's",
                                   many.engine_hit_rate, 0.9 * one.engine_hit_rate,
                                   at_least=True))  # fmt: skip
        dev_one, dev_many = _median_dev(one), _median_dev(many)
        if dev_one is not None and dev_many is not None:
            targets.append(_target(workload, frac, "split max dev <= one gateway's + 0.10",
                                   dev_many, dev_one + 0.10))  # fmt: skip
        out.append({
            "workload": workload,
            "load": frac,
            "single": single,
            "replicated": replicated,
            "rows": [
                {"contender": r.contender, "hit": r.engine_hit_rate,
                 "hit_rounds": [x.get("engine_hit_rate") for x in r.extra.get("rounds", [])],
                 "split": r.load_split, "split_max_dev": _median_dev(r),
                 "split_rounds": [x["load_split"] for x in r.extra.get("rounds", [])
                                  if x.get("load_split") is not None],
                 "ttft_p90_s": r.ttft_p90_s, "shared_state": r.extra.get("shared_state")}
                for r in (one, many)
            ],
            "targets": targets,
        })  # fmt: skip
    return out


def _median_dev(row: RunSummary) -> float | None:
    """The median over rounds of the load split's largest deviation (the row's own value
    when rounds did not record it)."""
    rounds: list[dict[str, Any]] = row.extra.get("rounds", [])
    devs: list[float] = sorted(d for x in rounds if (d := x.get("load_split_max_dev")) is not None)
    if not devs:
        return row.load_split_max_dev
    return devs[(len(devs) - 1) // 2]


def print_replicas(comparisons: Sequence[dict[str, Any]]) -> None:
    """The :func:`compare_replicas` rows as a small table plus MET/MISS lines."""
    for c in comparisons:
        print(f"\nreplicas vs one gateway: {c['workload']} @{c['load']:.2f}")
        print(f"  {'contender':<30}{'hit':>6}  {'hit per round':<16}{'ttft90':>7}"
              "  split per round (median max dev)")  # fmt: skip
        for r in c["rows"]:
            rounds = ",".join(_num(h) for h in r["hit_rounds"]) or "-"
            splits = r["split_rounds"] or [r["split"]]
            split = " ".join("/".join(f"{x * 100:.0f}" for x in s) or "-" for s in splits)
            print(f"  {r['contender']:<30}{_num(r['hit']):>6}  {rounds:<16}"
                  f"{_ms(r['ttft_p90_s']):>7}  {split} ({_num(r['split_max_dev'])})")  # fmt: skip
        for t in c["targets"]:
            mark = "MET " if t["met"] else "MISS"
            op = ">=" if t["at_least"] else "<="
            print(f"  [{mark}] {t['target']}: {t['value']:.3f} (limit {op} {t['limit']:.3f})")


def _target(
    workload: str, frac: float, name: str, value: float, limit: float, *, at_least: bool = False
) -> dict[str, Any]:
    """``value <= limit`` (``at_least``: ``value >= limit``) is met."""
    return {
        "workload": workload,
        "load": frac,
        "target": name,
        "value": value,
        "limit": limit,
        "at_least": at_least,
        "met": value >= limit if at_least else value <= limit,
    }


def write_json(path: Path, *, rows: Sequence[RunSummary], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": {
            **meta,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "unix_time": time.time(),
        },
        "runs": [asdict(r) for r in rows],
    }
    path.write_text(json.dumps(doc, indent=2, default=str))
