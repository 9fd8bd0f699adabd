"""One contender on one trace, the loop closed for real, and its summary.

Per run (the emulator and its Deployment are shared by the runs of a trace):

1. reset: the Deployment is scaled to the contender's starting replicas with no autoscaler
   running, and the benchmark waits until exactly that many pods are Ready and none drains
   (pods kept from the previous run are warm; new ones pay the cold start here);
2. ``switchyard serve`` starts with Kubernetes discovery and the contender's ``autoscaling:``
   section and must route to every Ready pod;
3. the load generator replays the trace while a recorder polls the Deployment and its pods;
4. the gateway stops (its autoscaler with it) and the summary is computed in simulated
   seconds over [0, trace duration].
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from benchmarks.autoscale import metrics as m
from benchmarks.autoscale.cluster import DeploymentSpec, Gateway, KubeSim, ReplicaRecorder
from benchmarks.autoscale.contenders import Capacity, Contender, autoscaling_section
from benchmarks.autoscale.loadgen import LoadResult, build_bodies, run_load
from benchmarks.autoscale.traces import Trace

__all__ = ["RunConfig", "RunResult", "run_contender", "summarize"]


@dataclass(frozen=True, slots=True)
class RunConfig:
    speed: float
    slo: m.Slo
    capacity: Capacity
    min_replicas: int
    max_replicas: int
    grace_s: float = 30.0  # after cold start: queues built before new pods turn Ready drain
    ttft_timeout_s: float = 60.0  # a user gives up (simulated seconds)
    poll_s: float = 0.1  # wall seconds between replica samples


@dataclass(slots=True)
class RunResult:
    contender: str
    trace: str
    samples: list[m.ReplicaSample]
    outcomes: list[m.RequestOutcome]
    errors: dict[str, int]
    cpu: dict[str, float | None]
    wall_s: float
    autoscaler_metrics: list[str] = field(default_factory=list)
    autoscaling: dict[str, Any] = field(default_factory=dict)


def start_replicas(c: Contender, trace: Trace, cfg: RunConfig) -> int:
    if c.static:
        return peak_replicas(trace, cfg)
    return max(cfg.min_replicas, cfg.capacity.needed(trace.rate_at(0.0)))


def peak_replicas(trace: Trace, cfg: RunConfig) -> int:
    """The static contender's replicas: what the trace's peak rate needs (README)."""
    return min(cfg.max_replicas, cfg.capacity.needed(trace.peak_rps * _size_factor(trace)))


def _size_factor(trace: Trace) -> float:
    """Mean prompt tokens of the trace's busiest part over the standard size's (the mix trace
    carries ~2.9x the tokens per request in its long-heavy phase)."""
    if trace.name != "mix":
        return 1.0
    s = trace.spec
    heavy = [r for r in trace.requests if s.step_at_s <= r.at_s < s.step_end_s]
    if not heavy:
        return 1.0
    return sum(r.prompt_tokens for r in heavy) / len(heavy) / s.prompt_mean


def run_contender(
    c: Contender,
    trace: Trace,
    *,
    sim: KubeSim,
    dep: DeploymentSpec,
    cfg: RunConfig,
    log_dir: Path,
    salt: str,
) -> RunResult:
    first = start_replicas(c, trace, cfg)
    sim.scale(dep, first)
    sim.wait_settled(dep, first, timeout_s=dep.cold_start_s / cfg.speed + 120.0)
    section = autoscaling_section(
        c,
        capacity=cfg.capacity,
        peak=peak_replicas(trace, cfg),
        slo=(cfg.slo.ttft_s, cfg.slo.itl_s),
        target=dep.name,
        namespace=dep.namespace,
        kubeconfig=sim.kubeconfig,
        speed=cfg.speed,
        min_replicas=cfg.min_replicas,
        max_replicas=cfg.max_replicas,
    )
    gw = Gateway(sim=sim, dep=dep, log_dir=log_dir, name=f"gateway-{trace.name}-{c.name}",
                 autoscaling=section)  # fmt: skip
    gw.start(engines=first)
    try:
        cpu0 = _cpu(sim, gw)
        psi0 = _cpu_pressure_us()
        started = time.perf_counter()
        results, recorder = anyio.run(_drive, trace, gw, sim, dep, cfg, salt)
        wall = time.perf_counter() - started
        cpu1 = _cpu(sim, gw)
        psi1 = _cpu_pressure_us()
        scraped = _autoscaler_lines(gw.url)
    finally:
        gw.stop()
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            key = r.error.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    return RunResult(
        contender=c.name,
        trace=trace.name,
        samples=[s for s in recorder.samples if s.t <= trace.duration_s],
        outcomes=[r.outcome(cfg.speed) for r in results],
        errors=errors,
        cpu=_usage(cpu0, cpu1, wall, recorder)
        | {
            "host_cpu_pressure": None
            if psi0 is None or psi1 is None
            else (psi1 - psi0) / 1e6 / wall
        },
        wall_s=wall,
        autoscaler_metrics=scraped,
        autoscaling=section,
    )


async def _drive(
    trace: Trace, gw: Gateway, sim: KubeSim, dep: DeploymentSpec, cfg: RunConfig, salt: str
) -> tuple[list[LoadResult], ReplicaRecorder]:
    bodies = build_bodies(trace.requests, model=dep.model, salt=salt, seed=trace.seed)
    t0 = time.perf_counter() + 0.2
    recorder = ReplicaRecorder(sim.url, dep, cfg.speed, t0, poll_s=cfg.poll_s)
    async with anyio.create_task_group() as tg:
        tg.start_soon(recorder.run, trace.duration_s / cfg.speed)
        results = await run_load(
            trace.requests, bodies, url=gw.url, speed=cfg.speed, t0=t0,
            ttft_timeout_s=cfg.ttft_timeout_s,
        )  # fmt: skip
    return results, recorder


def _cpu(sim: KubeSim, gw: Gateway) -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "kube_sim": sim.proc.cpu_s() if sim.proc is not None else 0.0,
        "gateway": gw.cpu_s(),
        "loadgen": own.ru_utime + own.ru_stime,
    }


def _usage(
    before: dict[str, float], after: dict[str, float], wall: float, recorder: ReplicaRecorder
) -> dict[str, float | None]:
    """Cores used per process over the run, the host's load and the emulator's poll p99."""
    usage: dict[str, float | None] = {k: (after[k] - before[k]) / wall for k in before}
    usage["host_load_1m"] = _loadavg()
    usage["emulator_poll_p99_ms"] = _p99_ms(recorder.rtts_s)
    return usage


def _p99_ms(values: list[float]) -> float | None:
    v = _pct(sorted(values), 99)
    return None if v is None else round(v * 1000, 1)


def _cpu_pressure_us() -> float | None:
    """Linux PSI: total microseconds some task waited for a CPU (None without PSI)."""
    try:
        with open("/proc/pressure/cpu") as fh:
            first = fh.readline().split()
        return float(first[-1].split("=")[1])
    except (OSError, ValueError, IndexError):
        return None


def _loadavg() -> float:
    """The host's 1-minute load average at the end of a run (other work on the 2 cores
    inflates the measured latencies: the engines' clock pauses when the host lags)."""
    try:
        with open("/proc/loadavg") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def _autoscaler_lines(url: str) -> list[str]:
    try:
        text = httpx.get(f"{url}/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return []
    return [ln for ln in text.splitlines() if ln.startswith("switchyard_autoscaler_")][:200]


def summarize(run: RunResult, trace: Trace, cfg: RunConfig) -> dict[str, Any]:
    """The per-contender numbers of the report (simulated seconds)."""
    end = trace.duration_s
    rs = m.replica_seconds(run.samples, end_s=end)
    desired = [s.desired for s in sorted(run.samples, key=lambda s: s.t)]
    blind = [(t, t + cfg.capacity.cold_start_s + cfg.grace_s) for t in trace.load_steps]
    steps = trace.load_steps
    needed = peak_replicas(trace, cfg)
    first = [m.first_increase_after(run.samples, t) for t in steps]
    ready = [m.ready_after(run.samples, t, needed) for t in steps]
    ok = [o for o in run.outcomes if o.ok]
    ttfts = sorted(o.ttft_s for o in ok if o.ttft_s is not None)
    itls = sorted(o.itl_s for o in ok if o.itl_s is not None)
    return {
        "slo_attainment": m.attainment(run.outcomes, cfg.slo) or 0.0,
        "slo_attainment_capacity": m.attainment(run.outcomes, cfg.slo, exclude=blind),
        "ttft_attainment": m.attainment(run.outcomes, m.Slo(ttft_s=cfg.slo.ttft_s, itl_s=1e9)),
        "itl_attainment": m.attainment(run.outcomes, m.Slo(ttft_s=1e9, itl_s=cfg.slo.itl_s)),
        "gpu_hours": rs / 3600.0,
        "replica_seconds": rs,
        "scale_events": m.scale_events(desired),
        "reversals": m.reversals(desired),
        "first_decision_s": first[0] if first else None,
        "ready_capacity_s": ready[0] if ready else None,
        "first_decision_all_s": first,
        "ready_capacity_all_s": ready,
        "max_replicas": max(desired, default=0),
        "requests": len(run.outcomes),
        "ok": len(ok),
        "errors": run.errors,
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p99_s": _pct(ttfts, 99),
        "itl_p50_s": _pct(itls, 50),
        "itl_p99_s": _pct(itls, 99),
        "cpu_cores": run.cpu,
        "wall_s": run.wall_s,
        "timeline": [[round(s.t, 2), s.desired, s.ready, s.pods] for s in run.samples],
        "autoscaler_metrics": run.autoscaler_metrics,
        "policy": run.autoscaling.get("policy"),
        "policy_settings": run.autoscaling.get("policy_settings"),
        # Per request [arrival, TTFT, mean ITL, ok] (simulated s): re-score other SLOs offline.
        "requests_detail": [
            [round(o.at_s, 3), _r(o.ttft_s), _r(o.itl_s, 5), int(o.ok)] for o in run.outcomes
        ],
    }


def _r(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, max(0, int(round(q / 100 * len(values))) - 1))]
