"""Runs the regimes: fresh fake engines per regime, every contender started once per regime
and measured round by round in a rotated order on the same engines.

A cell = one contender at one concurrency in one round: wrk for ``duration_s`` while the
contender's process-group CPU (before/after) and RSS (sampled) are read, plus the engines'
per-path counters before/after (the load split and whether streams ended).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.overhead.contenders import Running, Skip, Starter
from benchmarks.overhead.harness import cpu_us_per_request, median
from benchmarks.overhead.load import CHAT_PATH, Script, run_wrk, ttft_probe
from benchmarks.overhead.procs import LaunchError, Proc, Sampler, spawn, wait_ready
from benchmarks.overhead.regimes import Preset, Regime
from benchmarks.ports import free_ports

Say = Callable[[str], None]


@dataclass(slots=True)
class Engines:
    procs: list[Proc]
    urls: list[str]

    def counters(self) -> list[dict[str, Any]]:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            return [client.get(f"{u}/stats").json() for u in self.urls]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def start_engines(n: int, regime: Regime, logs: Path) -> Engines:
    ports = free_ports(n)
    procs = []
    for i, port in enumerate(ports):
        argv = [sys.executable, "-m", "benchmarks.overhead.fake_engine", "--port", str(port),
                "--delay-ms", str(regime.delay_ms), "--tokens", str(regime.tokens),
                "--itl-ms", str(regime.itl_ms)]  # fmt: skip
        procs.append(spawn(f"engine{i}-{regime.key}", argv, logs))
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for proc, url in zip(procs, urls, strict=True):
            wait_ready(proc, f"{url}/health", timeout_s=30)
    except LaunchError:
        for p in procs:
            p.stop()
        raise
    return Engines(procs, urls)


@dataclass(slots=True)
class Cell:
    regime: str
    round: int
    contender: str
    c: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int
    error_detail: dict[str, int]
    cpu_s: float | None
    cpu_us_per_req: float | None
    peak_rss_mb: float | None
    split: list[int]
    streams_done: int
    streams_cut: int
    ttft_p50_ms: float | None = None
    ttft_checks: dict[str, Any] = field(default_factory=dict)


def _delta(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> tuple[list[int], int, int]:
    split = [a["counts"].get(CHAT_PATH, 0) - b["counts"].get(CHAT_PATH, 0)
             for b, a in zip(before, after, strict=True)]  # fmt: skip
    done = sum(a["streams_done"] - b["streams_done"] for b, a in zip(before, after, strict=True))
    cut = sum(a["streams_cut"] - b["streams_cut"] for b, a in zip(before, after, strict=True))
    return split, done, cut


def measure(
    regime: Regime, rnd: int, name: str, run: Running | None, engines: Engines, c: int,
    script: Script, duration_s: float,
) -> Cell:  # fmt: skip
    """One timed wrk run; ``run=None`` is direct (one wrk per engine; direct-1 at c=1)."""
    urls = [run.url] if run else (engines.urls[:1] if c == 1 else engines.urls)
    before = engines.counters()
    cpu0 = run.proc.usage()[0] if run else None
    if run:
        with Sampler(run.proc, every_s=0.5, max_s=duration_s + 120) as sampler:
            res = run_wrk(urls, c, duration_s, script, auth=run.auth)
        peak: float | None = sampler.peak / 2**20
    else:
        res, peak = run_wrk(urls, c, duration_s, script), None
    cpu_s = run.proc.usage()[0] - cpu0 if run and cpu0 is not None else None
    split, done, cut = _delta(before, engines.counters())
    return Cell(
        regime=regime.key, round=rnd, contender=name, c=c, rps=res.rps, p50_ms=res.p50_ms,
        p90_ms=res.p90_ms, p99_ms=res.p99_ms, requests=res.requests, errors=res.errors,
        error_detail={"non2xx": res.non2xx, **res.socket_errors}, cpu_s=cpu_s,
        cpu_us_per_req=cpu_us_per_request(cpu_s, res.requests), peak_rss_mb=peak, split=split,
        streams_done=done, streams_cut=cut,
    )  # fmt: skip


def ttft(
    run: Running | None, engines: Engines, k: int, tokens: int
) -> tuple[float | None, dict[str, Any]]:
    """TTFT p50 of requests 2..k on one keep-alive connection at c=1, and stream checks."""
    url = run.url if run else engines.urls[0]
    checks = ttft_probe(url, k, tokens, auth=run.auth if run else None)
    later = [ch.ttft_ms for ch in checks[1:]] or [checks[0].ttft_ms]
    info = {
        "first_ttft_ms": round(checks[0].ttft_ms, 3),
        "all_done": all(ch.done for ch in checks),
        "content_chunks": sorted({ch.content_chunks for ch in checks}),
        "total_p50_ms": median(ch.total_ms for ch in checks),
    }
    return median(later), info


def run_regime(
    regime: Regime,
    starters: dict[str, Starter],
    preset: Preset,
    logs: Path,
    say: Say,
    advance: Callable[[], None],
    *,
    bodies: Path | None = None,
    engines_n: int = 3,
) -> tuple[list[Cell], dict[str, str]]:
    """All rounds of one regime; returns the cells and the skipped contenders (with reasons)."""
    script = regime.script
    if bodies is not None and script.lua == "bodies.lua":
        script = Script(script.lua, (*script.env, ("WRK_BODIES", str(bodies))))
    engines = start_engines(engines_n, regime, logs / regime.key)
    running: dict[str, Running | None] = {"direct": None}
    skipped: dict[str, str] = {}
    cells: list[Cell] = []
    try:
        for name, start in starters.items():
            try:
                running[name] = start(engines.urls, logs / regime.key)
            except (Skip, LaunchError, OSError) as exc:
                skipped[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                say(f"[yellow]{regime.key}: skipping {name}: {exc}[/]")
        for run in running.values():  # warm-up: connections, pools, caches
            run_wrk([run.url] if run else engines.urls[:1], min(8, max(regime.concurrency)),
                    preset.warmup_s, script, auth=run.auth if run else None)  # fmt: skip
        names = list(running)
        for rnd in range(preset.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for c in regime.concurrency:
                for name in order:
                    if not _alive(running[name]):
                        skipped.setdefault(name, "process exited during the run")
                        advance()
                        continue
                    cell = measure(regime, rnd, name, running[name], engines, c, script,
                                   preset.duration_s)  # fmt: skip
                    if regime.ttft:
                        cell.ttft_p50_ms, cell.ttft_checks = ttft(
                            running[name], engines, preset.ttft_k, regime.tokens
                        )
                    cells.append(cell)
                    say(_line(cell))
                    advance()
    finally:
        for run in running.values():
            if run is not None:
                run.stop()
        engines.stop()
    return cells, skipped


def _alive(run: Running | None) -> bool:
    return run is None or run.proc.alive()


def _line(cell: Cell) -> str:
    cpu = f"{cell.cpu_us_per_req:,.0f} us/req" if cell.cpu_us_per_req is not None else "-"
    extra = f" ttft {cell.ttft_p50_ms:.2f} ms" if cell.ttft_p50_ms is not None else ""
    err = f" [red]errors {cell.errors}[/]" if cell.errors else ""
    return (f"{cell.regime} r{cell.round} {cell.contender:<28} c={cell.c:<3} "
            f"{cell.rps:>9,.0f} req/s p50 {cell.p50_ms:6.2f} ms p99 {cell.p99_ms:6.2f} ms "
            f"cpu {cpu} split {cell.split}{extra}{err}")  # fmt: skip


def soak(
    start: Starter, preset: Preset, logs: Path, say: Say, advance: Callable[[], None],
    regime: Regime,
) -> dict[str, Any]:  # fmt: skip
    """Regime g: ``soak_requests`` through one Switchyard (rr, zero-delay engines) in wrk
    segments, RSS of its process group sampled every second."""
    engines = start_engines(3, regime, logs / "g")
    run = None
    try:
        run = start(engines.urls, logs / "g")
        checkpoints: list[dict[str, float]] = []
        total, t0 = 0, time.monotonic()
        max_segments = 1 + preset.soak_requests // 200  # bound even at 20 req/s per segment-s
        with Sampler(run.proc, every_s=1.0, max_s=3600) as sampler:
            for _ in range(max_segments):
                if total >= preset.soak_requests or not run.proc.alive():
                    break
                res = run_wrk([run.url], 32, preset.soak_segment_s, regime.script)
                total += res.requests
                rss = run.proc.usage()[1] / 2**20
                checkpoints.append(
                    {
                        "requests": total,
                        "rss_mb": rss,
                        "t_s": time.monotonic() - t0,
                        "errors": res.errors,
                    }
                )
                say(f"g: {total:,} requests, RSS {rss:.1f} MB, {res.rps:,.0f} req/s")
                advance()
        warm = next((c for c in checkpoints if c["requests"] >= preset.soak_warmup), None)
        end = checkpoints[-1] if checkpoints else None
        return {
            "contender": run.name, "requests": total, "checkpoints": checkpoints,
            "rss_after_warmup_mb": warm["rss_mb"] if warm else None,
            "rss_end_mb": end["rss_mb"] if end else None,
            "samples": [{"t_s": round(t, 2), "rss_mb": round(r / 2**20, 2)}
                        for t, r in sampler.samples],
        }  # fmt: skip
    finally:
        if run is not None:
            run.stop()
        engines.stop()


def cells_json(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cells]
