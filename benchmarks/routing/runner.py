"""Orchestrates the routing benchmark: workloads x load ladder x contenders, same engines.

For each workload a saturation probe first finds the highest Poisson rate
``inproc:least-request`` sustains without a growing queue (:func:`probe_saturation`); the load
ladder is fractions of that. Then, per
(workload, load) step, every contender replays the *same* request list (same prompts, same
arrival times) against a *fresh* enginesim cluster (caches start cold for everyone), with the
contender order rotated per step so no contender always runs first. With ``rounds`` > 1 each
step is repeated (order rotated again) and the round with the median TTFT p90 is reported,
every round's numbers kept in ``extra["rounds"]``. Between start and end of a
run the engines' ``/metrics`` are scraped for engine-side hit rate and load split.

Contenders (``kind:policy``):

* ``inproc:<policy>`` -- our routing package inside the client (:mod:`.inproc`), byte blocks;
* ``inproc-tok:<policy>`` -- the same with the engine's tokenizer: 16-token blocks;
* ``inproc-kv:<policy>`` -- token blocks plus the engines' KV events (precise index);
* ``gateway:<policy>`` -- ``switchyard serve`` in front of the engines;
* ``gateway-<N>r:<policy>`` -- N ``switchyard serve`` replicas sharing routing state through
  a redis-server started for the run, the load spread over them round-robin by request;
  ``gateway-<N>r-local:<policy>`` the same replicas without Redis (each on its own state);
* ``sglang-router:<policy>``, ``vllm-router:<policy>`` -- peers from their own venvs;
* ``oracle`` -- computed, not run (:mod:`.oracle`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx

from benchmarks.routing import launch
from benchmarks.routing.inproc import InProcRouter
from benchmarks.routing.loadgen import (
    Dispatcher,
    FixedTarget,
    Result,
    RoundRobinTargets,
    run_load,
)
from benchmarks.routing.oracle import oracle
from benchmarks.routing.report import RunSummary, pct, summarize
from benchmarks.routing.workloads import BenchRequest, WorkloadSpec, generate
from enginesim.core.profile import load_profile
from enginesim.server.codec import load_codec
from routing.metrics_parser import EngineMetrics, MetricsParseError, parse_vllm_metrics
from routing.registry import builtin_policies

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    workloads: tuple[str, ...]
    contenders: tuple[str, ...]
    fractions: tuple[float, ...]
    spec: WorkloadSpec
    engines: int = 4
    profile: str = "llama3-8b-a100"
    kv_blocks: int | None = None
    """Override the profile's ``num_gpu_blocks`` (KV capacity per engine), timing unchanged."""
    model: str = "llama3-8b"
    speed: float = 10.0
    seed: int = 0
    max_requests: int = 150
    probe_requests: int = 80
    probe_steps: int = 8
    rounds: int = 1
    saturation_rps: float | None = None
    max_run_wall_s: float = 120.0
    scrape_interval_s: float = 0.5
    sync_interval_s: float | None = None
    """``gateway-<N>r`` replicas' ``redis.sync_interval_s`` (None: the gateway's default)."""
    log_dir: Path = Path("results/routing-logs")


def scrape_all(urls: Sequence[str]) -> dict[str, EngineMetrics]:
    out: dict[str, EngineMetrics] = {}
    with httpx.Client(timeout=5.0) as client:
        for i, url in enumerate(urls):
            try:
                out[f"e{i}"] = parse_vllm_metrics(client.get(f"{url}/metrics").text)
            except (httpx.HTTPError, MetricsParseError) as exc:
                log.warning("scrape %s failed: %s", url, exc)
    return out


async def _drive(
    requests: Sequence[BenchRequest],
    dispatcher: Dispatcher,
    cfg: BenchConfig,
    kv_event_urls: Sequence[str] = (),
) -> tuple[list[Result], dict[str, Any]]:
    load = partial(
        run_load,
        requests,
        dispatcher,
        model=cfg.model,
        speed=cfg.speed,
        max_duration_s=cfg.max_run_wall_s,
    )
    if not isinstance(dispatcher, InProcRouter):
        return await load()
    async with httpx.AsyncClient(timeout=5.0) as client, anyio.create_task_group() as tg:
        tg.start_soon(dispatcher.scrape_forever, client, cfg.scrape_interval_s / cfg.speed)
        for eid, zmq_url in zip(dispatcher.states, kv_event_urls, strict=False):
            tg.start_soon(dispatcher.consume_kv_events, eid, zmq_url)
        await anyio.sleep(0.2)  # let SUB sockets connect before the first request
        results, info = await load()
        tg.cancel_scope.cancel()
    route_s = sorted(dispatcher.route_s)
    info["route_us_p50"] = (pct(route_s, 50) or 0.0) * 1e6
    info["route_us_p99"] = (pct(route_s, 99) or 0.0) * 1e6
    info["index"] = asdict(dispatcher.index.stats())
    info["kv_feeds"] = {e: asdict(f.stats()) for e, f in dispatcher.feeds.items()}
    return results, info


def run_contender(
    contender: str, requests: Sequence[BenchRequest], cfg: BenchConfig, tag: str
) -> tuple[list[Result], dict[str, Any], dict[str, EngineMetrics], dict[str, EngineMetrics]]:
    """One run on a fresh cluster; raises :class:`launch.LaunchError` if it cannot start."""
    kind, _, policy = contender.partition(":")
    log_dir = cfg.log_dir / tag
    cluster = launch.start_enginesim(
        engines=cfg.engines,
        profile=cfg.profile,
        speed=cfg.speed,
        model=cfg.model,
        log_dir=log_dir,
        kv_events=kind == "inproc-kv",
    )
    targets: list[launch.Proc] = []  # router processes: stopped at the end, CPU counted
    replicas = gateway_replicas(kind)
    try:
        dispatcher: Dispatcher
        if kind in ("inproc", "inproc-tok", "inproc-kv"):
            built = builtin_policies()[policy]()
            engines = dict(zip(cluster.ids, cluster.urls, strict=True))
            profile = load_profile(cfg.profile)
            codec = load_codec(profile) if kind != "inproc" else None
            dispatcher = InProcRouter(
                built, engines, model=cfg.model, codec=codec, block_size=profile.block_size
            )
        elif kind == "gateway":
            target, url = launch.start_gateway(
                policy=policy, engine_urls=cluster.urls, model=cfg.model, log_dir=log_dir
            )
            targets.append(target)
            dispatcher = FixedTarget(url, headers={"x-switchyard-routing": policy})
        elif replicas is not None:
            redis_url = None
            if not kind.endswith("-local"):
                redis, redis_url = launch.start_redis(log_dir=log_dir)
                targets.append(redis)
            urls: list[str] = []
            sync: dict[str, object] = {}
            if cfg.sync_interval_s:
                sync["sync_interval_s"] = cfg.sync_interval_s
            for i in range(replicas):
                target, url = launch.start_gateway(
                    policy=policy, engine_urls=cluster.urls, model=cfg.model, log_dir=log_dir,
                    redis_url=redis_url, redis_extra=sync, name=f"gateway-{policy}-r{i}",
                )  # fmt: skip
                targets.append(target)
                urls.append(url)
            dispatcher = RoundRobinTargets(tuple(urls), headers={"x-switchyard-routing": policy})
        elif kind in ("sglang-router", "vllm-router"):
            target, url = launch.start_peer(
                peer=kind, policy=policy, engine_urls=cluster.urls, log_dir=log_dir
            )
            targets.append(target)
            dispatcher = FixedTarget(url)
        else:
            raise launch.LaunchError(f"unknown contender kind {kind!r}")
        before = scrape_all(cluster.urls)
        cpu_at = [p.cpu_s() for p in targets]
        results, info = anyio.run(_drive, requests, dispatcher, cfg, cluster.kv_event_urls)
        cpu_now = [p.cpu_s() for p in targets]
        used = [
            b - a for a, b in zip(cpu_at, cpu_now, strict=True) if a is not None and b is not None
        ]
        if targets and len(used) == len(targets):
            # The router processes' CPU during the load only (not their start-up imports);
            # for replicas, every gateway plus their redis-server (each one in parts).
            info["router_cpu_s"] = sum(used)
            if len(targets) > 1:
                info["router_cpu_parts_s"] = {p.name: u for p, u in zip(targets, used, strict=True)}
        if isinstance(dispatcher, RoundRobinTargets):
            info["shared_state"] = shared_state_stats(dispatcher.base_urls)
        after = scrape_all(cluster.urls)
        return results, info, before, after
    finally:
        for target in targets:
            target.stop()
        cluster.proc.stop()


def gateway_replicas(kind: str) -> int | None:
    """``gateway-<N>r`` -> N (gateways sharing a redis-server); ``gateway-<N>r-local`` -> N
    as well (the control: the same replicas without Redis, each on its own state); else
    None."""
    m = re.fullmatch(r"gateway-(\d+)r(-local)?", kind)
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


SHARED_STATE_SERIES = (
    "switchyard_shared_state_replicas",
    "switchyard_shared_state_sync_errors_total",
    "switchyard_shared_state_sync_seconds_count",
    "switchyard_shared_state_sync_seconds_sum",
    'switchyard_shared_state_prefix_records_total{direction="sent"}',
    'switchyard_shared_state_prefix_records_total{direction="received"}',
    "switchyard_redis_healthy_ratio",
)


def parse_series(text: str, names: Sequence[str]) -> dict[str, float]:
    """The values of exactly these series (name plus label text) in a /metrics page."""
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series in wanted:
            out[series] = float(value)
    return out


def shared_state_stats(urls: Sequence[str]) -> list[dict[str, float]]:
    """Each replica's shared-state counters after the run (syncs, errors, records)."""
    out: list[dict[str, float]] = []
    with httpx.Client(timeout=5.0) as client:
        for url in urls:
            try:
                out.append(parse_series(client.get(f"{url}/metrics").text, SHARED_STATE_SERIES))
            except httpx.HTTPError as exc:
                log.warning("metrics of %s failed: %s", url, exc)
                out.append({})
    return out


def _knee(results: Sequence[Result], speed: float) -> tuple[float | None, bool]:
    """TTFT p50 (simulated s) and whether the queue grew over the run (last vs first quarter)."""
    ok = sorted((r for r in results if r.ok and r.ttft_s is not None), key=lambda r: r.idx)
    ttfts = [(r.ttft_s or 0.0) * speed for r in ok]
    if len(ttfts) < 8:
        return None, True
    q = len(ttfts) // 4
    first, last = sum(ttfts[:q]) / q, sum(ttfts[-q:]) / q
    return pct(ttfts, 50), last > 2.0 * first + 0.05


def probe_saturation(workload: str, cfg: BenchConfig) -> tuple[float, dict[str, Any]]:
    """The highest rate ``inproc:least-request`` sustains (see module docstring).

    A ramp of short open-loop runs starting at a quarter of the uncached-prefill bound,
    x1.5 per step, stops at the first step whose TTFT p50 exceeds 3x the first step's or whose
    TTFT grows across the run (a queue building up) twice in a row at the same rate (once
    may be a stall of the shared host); the previous step's rate is the answer. Workloads
    with sessions (multi-turn, mix) skip the growth test: their later requests are later
    turns with longer contexts, so TTFT rises across a run at any load (it fired at 26.6 req/s
    with least-request's TTFT p50 at 83 ms, 1.3x the first step's). They also probe with the
    whole run (``max_requests``), not ``probe_requests``: the first 160 requests are the
    first turns of a few sessions, whose think-time-gated load never reaches a knee (the
    probe ran into its step cap at 134.7 req/s, 8x the real saturation).
    """
    sessions = workload in ("multi-turn", "mix")
    probe_n = cfg.max_requests if sessions else cfg.probe_requests
    profile = load_profile(cfg.profile)
    sample = generate(workload, cfg.spec, rate=1.0, seed=cfg.seed)[:probe_n]
    words = sum(len(r.prompt_text().split()) for r in sample) / len(sample)
    rate = 0.25 * cfg.engines / (words * profile.c_prefill_s)
    steps: list[dict[str, Any]] = []
    base: float | None = None
    sustained: float | None = None
    retried = False
    for _ in range(cfg.probe_steps + 2):
        requests = _truncate(generate(workload, cfg.spec, rate=rate, seed=cfg.seed), probe_n)
        results, _, _, _ = run_contender(
            "inproc:least-request", requests, cfg, f"{workload}-probe-{rate:.2f}"
        )
        p50, growing = _knee(results, cfg.speed)
        growing = growing and not sessions
        base = base if base is not None else p50
        saturated = p50 is None or growing or (base is not None and p50 > 3.0 * base)
        steps.append({"rate": rate, "ttft_p50_s": p50, "growing": growing, "saturated": saturated})
        print(f"  probe {rate:7.2f} req/s: ttft p50 {p50} growing {growing}", flush=True)
        if saturated and not retried:
            retried = True  # a host stall can fake a knee once: confirm it at the same rate
            continue
        if saturated:
            break
        retried = False
        sustained = rate
        rate *= 1.5
        if sum(1 for st in steps if not st["saturated"]) >= cfg.probe_steps:
            break
    return (sustained or rate / 1.5), {"probe_steps": steps}


def oracle_row(
    workload: str, rate: float, frac: float, requests: Sequence[BenchRequest],
    results: Sequence[Result], cfg: BenchConfig,
) -> RunSummary:  # fmt: skip
    profile = load_profile(cfg.profile)
    rows = oracle(requests, [r.prompt_tokens for r in results], profile=profile, model=cfg.model)
    ttfts = [o.ttft_s for o in rows]
    prompt = sum(o.prompt_tokens for o in rows)
    return RunSummary(
        workload=workload,
        contender="oracle",
        rate_rps=rate,
        fraction=frac,
        requests=len(rows),
        ok=len(rows),
        errors={},
        ttft_p50_s=pct(ttfts, 50),
        ttft_p90_s=pct(ttfts, 90),
        ttft_p99_s=pct(ttfts, 99),
        itl_p50_s=None,
        output_tok_per_s=None,
        engine_hit_rate=sum(o.cached_tokens for o in rows) / prompt if prompt else None,
        load_split=[],
        load_split_max_dev=None,
        extra={"note": "idle engines, unlimited cache, perfect placement: a bound"},
    )


def sized_profile(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with its profile replaced by a JSON copy holding ``kv_blocks`` GPU blocks."""
    if cfg.kv_blocks is None:
        return cfg
    base = load_profile(cfg.profile)
    raw = {k: getattr(base, k) for k in base.__dataclass_fields__}
    raw.update(num_gpu_blocks=cfg.kv_blocks, name=f"{base.name}-kv{cfg.kv_blocks}")
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.log_dir / f"{base.name}-kv{cfg.kv_blocks}.json"
    path.write_text(json.dumps(raw, indent=1, default=str))
    load_profile(path)  # fail early if the copy does not load
    return replace(cfg, profile=str(path))


def run_benchmark(cfg: BenchConfig) -> tuple[list[RunSummary], dict[str, Any]]:
    cfg = sized_profile(cfg)
    rows: list[RunSummary] = []
    kv = load_profile(cfg.profile)
    meta: dict[str, Any] = {
        "config": {**_jsonable(cfg)},
        "kv_tokens_per_engine": kv.num_gpu_blocks * kv.block_size,
        "saturation": {},
        "skipped": [],
    }
    step = 0
    for workload in cfg.workloads:
        if cfg.saturation_rps is not None:
            sat, probe_info = cfg.saturation_rps, {"given": True}
        else:
            sat, probe_info = probe_saturation(workload, cfg)
        meta["saturation"][workload] = {"rps": sat, **probe_info}
        print(f"[{workload}] saturation ~ {sat:.2f} req/s (simulated)", flush=True)
        for frac in cfg.fractions:
            rate = sat * frac
            requests = generate(workload, cfg.spec, rate=rate, seed=cfg.seed)
            requests = _truncate(requests, cfg.max_requests)
            reference: list[Result] | None = None
            rounds: dict[str, list[RunSummary]] = {}
            for rnd in range(cfg.rounds):
                step += 1
                order = [c for c in cfg.contenders if c != "oracle"]
                order = order[step % len(order) :] + order[: step % len(order)]
                for contender in order:
                    tag = f"{workload}-{frac:.2f}-r{rnd}-{contender.replace(':', '-')}"
                    try:
                        results, info, before, after = run_contender(contender, requests, cfg, tag)
                    except (launch.LaunchError, KeyError) as exc:
                        print(f"  skip {contender}: {exc}"[:300], flush=True)
                        meta["skipped"].append({"contender": contender, "reason": str(exc)[-500:]})
                        continue
                    reference = reference or results
                    row = summarize(
                        workload=workload, contender=contender, rate_rps=rate, fraction=frac,
                        results=results, speed=cfg.speed, before=before, after=after, extra=info,
                    )  # fmt: skip
                    rounds.setdefault(contender, []).append(row)
                    cpu = info.get("router_cpu_s")
                    print(
                        f"  r{rnd} {contender:<28} ok {row.ok}/{row.requests} ttft p90 "
                        f"{(row.ttft_p90_s or 0) * 1e3:.0f} ms hit {row.engine_hit_rate}"
                        + (f" router cpu {cpu:.1f} s" if cpu is not None else ""),
                        flush=True,
                    )
            rows.extend(median_run(runs) for runs in rounds.values())
            if "oracle" in cfg.contenders and reference is not None:
                rows.append(oracle_row(workload, rate, frac, requests, reference, cfg))
    return rows, meta


_MEDIAN_FIELDS = (
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_p50_s", "output_tok_per_s", "engine_hit_rate",
)  # fmt: skip


def median_run(runs: Sequence[RunSummary]) -> RunSummary:
    """Per metric the median over rounds, plus ``extra["spread"]``: metric -> [min, max].

    The row (load split, errors, run info) is the round whose TTFT p90 is the median; its
    latency, throughput and hit-rate fields are each replaced by their median over the
    rounds (the lower middle for an even count). Every round's numbers stay in
    ``extra["rounds"]``.
    """
    ordered = sorted(runs, key=lambda r: r.ttft_p90_s if r.ttft_p90_s is not None else 1e18)
    chosen = ordered[(len(ordered) - 1) // 2]
    medians: dict[str, float | None] = {}
    spread: dict[str, list[float]] = {}
    for name in _MEDIAN_FIELDS:
        values = sorted(v for r in runs if (v := getattr(r, name)) is not None)
        medians[name] = values[(len(values) - 1) // 2] if values else None
        if values:
            spread[name] = [values[0], values[-1]]
    rounds = [
        {**{name: getattr(r, name) for name in _MEDIAN_FIELDS},
         "router_cpu_s": r.extra.get("router_cpu_s"),
         "load_split": r.load_split, "load_split_max_dev": r.load_split_max_dev}
        for r in runs
    ]  # fmt: skip
    cpus = sorted(c for r in runs if (c := r.extra.get("router_cpu_s")) is not None)
    extra = {**chosen.extra, "rounds": rounds, "spread": spread}
    if cpus:
        extra["router_cpu_s"] = cpus[(len(cpus) - 1) // 2]
    return replace(
        chosen,
        ttft_p50_s=medians["ttft_p50_s"],
        ttft_p90_s=medians["ttft_p90_s"],
        ttft_p99_s=medians["ttft_p99_s"],
        itl_p50_s=medians["itl_p50_s"],
        output_tok_per_s=medians["output_tok_per_s"],
        engine_hit_rate=medians["engine_hit_rate"],
        extra=extra,
    )


def _truncate(requests: list[BenchRequest], n: int) -> list[BenchRequest]:
    """The first ``n`` requests, dropping turns whose previous turn was cut off."""
    head = requests[:n]
    return [r for r in head if r.depends_on is None or r.depends_on < len(head)]


def _jsonable(cfg: BenchConfig) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    out["spec"] = {k: getattr(cfg.spec, k) for k in cfg.spec.__dataclass_fields__}
    out["log_dir"] = str(cfg.log_dir)
    return out


def with_overrides(cfg: BenchConfig, **kw: Any) -> BenchConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
