"""Run one contender of the LoRA benchmark end to end and score it.

Fresh engines per contender (nothing loaded, except ``static``'s pinned adapters; ours,
``switchyard``, preloads before the trace, ``switchyard-cold`` does not), the same trace for
all, then: the client-side records, the residency polls, the load/unload counts (the
benchmark-side router's for the baselines; the gateway's ``switchyard_lora_operations_total``
for ours) and the requests that waited for a load (the router's per-request waits; the
gateway's ``switchyard_lora_on_demand_wait_seconds`` histogram). Everything in simulated
seconds; the records and polls also go to ``<log_dir>/<contender>/requests.jsonl`` and
``residency.jsonl``. Usage::

    result = run_contender("switchyard", RunConfig(log_dir=Path("results/lora-logs")))
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.lora.cluster import (
    BenchProfile,
    Proc,
    free_gateway_port,
    gateway_config,
    start_engines,
    start_gateway,
    write_adapters,
    write_profile,
)
from benchmarks.lora.loadgen import (
    GatewayTarget,
    ProgressHook,
    RouterTarget,
    Target,
    poll_residency,
    run_load,
)
from benchmarks.lora.metrics import (
    RequestRecord,
    ResidencySample,
    residency_changes,
    spread_times,
    summarize,
)
from benchmarks.lora.router import ClientRouter, RouterMode
from benchmarks.lora.traces import TraceConfig, adapter_rates, hot_adapters, make_trace

__all__ = ["CONTENDERS", "GATEWAY_PRELOAD", "GatewayCounts", "RunConfig", "run_contender"]

CONTENDERS: dict[str, RouterMode | None] = {
    "random-ondemand": "random",
    "static": "static",
    "least-request-ondemand": "least-request",
    "switchyard": None,  # the gateway: placement controller + LoRA-aware routing
    "switchyard-cold": None,  # the same with `placement.preload: false` (the default: true)
}
"""Contender name -> benchmark-side router mode (None: through the gateway)."""
GATEWAY_PRELOAD: dict[str, bool] = {"switchyard": True, "switchyard-cold": False}
"""Gateway contender -> its ``placement.preload``; a preloading one starts the trace once the
preload settled (:func:`wait_preloaded`), a cold one at once."""
TTFT_TIMEOUT_S = 120.0
PRELOAD_WAIT_S = 30.0
"""Wall seconds ours may spend preloading (``placement.preload``) before the trace starts."""


async def wait_preloaded(
    session: aiohttp.ClientSession, urls: Iterable[str], adapters: int, *, wall_s: float
) -> int:
    """Until the engines together list ``adapters`` adapters (or ``wall_s`` passed): the
    gateway's preload, the counterpart of ``static``'s pinning before the run. Returns the
    count listed (its loads are counted among ours, as static's pins are among its)."""
    deadline = time.perf_counter() + wall_s
    listed = 0
    while time.perf_counter() < deadline:
        listed = 0
        for url in urls:
            try:
                async with session.get(f"{url}/v1/models") as r:
                    data = (await r.json())["data"]
                listed += sum(1 for card in data if card.get("parent"))
            except (aiohttp.ClientError, ValueError, KeyError):
                pass
        if listed >= adapters:
            break
        await anyio.sleep(0.25)
    return listed


@dataclass(frozen=True, slots=True)
class RunConfig:
    """One run's knobs; ``*_s`` and rates in simulated units unless named ``wall``."""

    log_dir: Path
    trace: TraceConfig = TraceConfig()
    engines: int = 4
    speed: float = 3.0
    bench: BenchProfile = BenchProfile()
    hot_k: int = 2  # the adapters the shift makes hottest, whose spread is timed
    poll_wall_s: float = 0.25
    rate_per_replica: float = 2.0  # placement: an adapter's requests/s per engine
    min_residency_s: float = 10.0
    min_idle_s: float = 2.0
    idle_s: float = 60.0
    placement_interval_s: float = 2.0
    retry_after_s: float = 1.0
    policy: str = "least-request"
    seed: int = 0
    extra_lora: Mapping[str, Any] = field(default_factory=dict)

    def gateway_lora(self, *, preload: bool = True) -> dict[str, Any]:
        """The gateway's ``lora:`` knobs in its wall clock (simulated / speed, rates x speed);
        ``preload`` its ``placement.preload``."""
        s = self.speed
        return {
            "on_demand": True,
            "load_timeout_s": 60.0,
            "request_timeout_s": 60.0,
            "placement_interval_s": self.placement_interval_s / s,
            # the engines' CPU LoRA cache: as many adapters held per engine as `static`'s
            "max_cpu_loras": self.bench.max_cpu_loras,
            "retry_after_s": self.retry_after_s / s,
            "placement": {
                "rate_per_replica": self.rate_per_replica * s,
                "min_residency_s": self.min_residency_s / s,
                "min_idle_s": self.min_idle_s / s,
                "idle_s": self.idle_s / s,
                # fill the CPU-cache capacity left with adapters not requested yet, as
                # `static` pins all 50 before the run (ours: during its first rounds)
                "preload": preload,
            },
            **self.extra_lora,
        }


@dataclass(frozen=True, slots=True)
class GatewayCounts:
    """What the gateway's /metrics says about LoRA operations (waits in wall seconds)."""

    loads: int
    unloads: int
    waited: int
    wait_sum_wall_s: float


def gateway_counts(text: str) -> GatewayCounts:
    """Parse ``switchyard_lora_*`` families out of a gateway's /metrics text."""
    loads = unloads = waited = 0.0
    wait_sum = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "switchyard_lora_operations_total" and s.labels.get("outcome") == "ok":
                if s.labels.get("op") == "load":
                    loads += s.value
                elif s.labels.get("op") == "unload":
                    unloads += s.value
            elif s.name == "switchyard_lora_on_demand_wait_seconds_count":
                waited += s.value
            elif s.name == "switchyard_lora_on_demand_wait_seconds_sum":
                wait_sum += s.value
    return GatewayCounts(int(loads), int(unloads), int(waited), wait_sum)


def run_contender(
    name: str, cfg: RunConfig, *, progress: ProgressHook | None = None
) -> dict[str, Any]:
    """Start engines (+ gateway for ours), replay the trace, stop everything, score."""
    mode = CONTENDERS[name]
    run_dir = cfg.log_dir / name
    profile = write_profile(run_dir, cfg.bench)
    paths = write_adapters(
        cfg.log_dir / "adapters", cfg.trace.n_adapters, size_bytes=cfg.bench.adapter_bytes
    )
    trace = make_trace(cfg.trace)
    cluster = start_engines(cfg.engines, profile=profile, speed=cfg.speed, log_dir=run_dir)
    engines = {f"e{i}": u for i, u in enumerate(cluster.urls)}
    gateway: Proc | None = None
    try:
        gw_url: str | None = None
        if mode is None:
            port = free_gateway_port()
            config = gateway_config(port=port, engine_urls=engines, adapters=paths,
                                    max_loras=cfg.bench.max_loras,
                                    lora=cfg.gateway_lora(preload=GATEWAY_PRELOAD[name]),
                                    policy=cfg.policy)  # fmt: skip
            gateway = start_gateway(config, log_dir=run_dir)
            gw_url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        out = anyio.run(_drive, name, mode, cfg, trace, engines, paths, gw_url, progress)
        out["wall_s"] = round(time.perf_counter() - started, 1)
        out["cpu_s"] = {
            "engines": cluster.proc.cpu_s(),
            "gateway": gateway.cpu_s() if gateway is not None else None,
        }
        return out
    finally:
        if gateway is not None:
            gateway.stop()
        cluster.proc.stop()


async def _drive(
    name: str,
    mode: RouterMode | None,
    cfg: RunConfig,
    trace: list[Any],
    engines: dict[str, str],
    paths: dict[str, str],
    gw_url: str | None,
    progress: ProgressHook | None,
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=2048, limit_per_host=1024)
    timeout = aiohttp.ClientTimeout(total=600.0 / cfg.speed + 60.0, connect=5.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        router: ClientRouter | None = None
        target: Target
        if mode is None:
            assert gw_url is not None
            target = GatewayTarget(gw_url)
            if GATEWAY_PRELOAD[name]:
                # as `static` pins before the run: let the gateway's preload settle first
                await wait_preloaded(session, engines.values(), len(paths), wall_s=PRELOAD_WAIT_S)
        else:
            router = ClientRouter(list(engines.values()), mode=mode,
                                  max_loras=cfg.bench.max_loras, paths=paths, session=session,
                                  seed=cfg.seed)  # fmt: skip
            if mode == "static":
                await router.preload(sorted(paths))
            target = RouterTarget(router)
        samples: list[ResidencySample] = []
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            poll = functools.partial(poll_residency, session, engines, speed=cfg.speed, t0=t0,
                                     interval_s=cfg.poll_wall_s, out=samples)  # fmt: skip
            tg.start_soon(poll)
            records = await run_load(trace, target, speed=cfg.speed, session=session,
                                     salt=f"{name}-{cfg.seed}", seed=cfg.seed,
                                     ttft_timeout_s=TTFT_TIMEOUT_S,
                                     progress=progress)  # fmt: skip
            tg.cancel_scope.cancel()
        _dump(cfg.log_dir / name, records, samples)
        gw: GatewayCounts | None = None
        if gw_url is not None:
            async with session.get(f"{gw_url}/metrics") as r:
                text = await r.text()
            (cfg.log_dir / name / "gateway-metrics.txt").write_text(text)
            gw = gateway_counts(text)
    return _score(name, cfg, records, samples, router, gw)


def _dump(run_dir: Path, records: list[RequestRecord], samples: list[ResidencySample]) -> None:
    """Per request and per residency poll, one JSON line each (for looking into a tail)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(asdict(r)) for r in records)
    (run_dir / "requests.jsonl").write_text("".join(f"{line}\n" for line in lines))
    polls = (
        json.dumps({"t_s": x.t_s, "engines": {e: sorted(a) for e, a in x.engines.items()}})
        for x in samples
    )
    (run_dir / "residency.jsonl").write_text("".join(f"{line}\n" for line in polls))


def _end_s(records: list[RequestRecord], duration_s: float) -> float:
    end = duration_s
    for r in records:
        if r.ttft_s is not None:
            end = max(end, r.at_s + r.ttft_s + (r.itl_s or 0.0) * max(0, r.tokens - 1))
    return end


def _score(
    name: str,
    cfg: RunConfig,
    records: list[RequestRecord],
    samples: list[ResidencySample],
    router: ClientRouter | None,
    gw: GatewayCounts | None,
) -> dict[str, Any]:
    # A failed request counts at the client's first-token timeout, so failures raise p99.
    s = summarize(
        records, duration_s=_end_s(records, cfg.trace.duration_s), timeout_ttft_s=TTFT_TIMEOUT_S
    )
    hot = hot_adapters(cfg.trace, phase=1, k=cfg.hot_k)
    spread = spread_times(samples, hot, after_s=cfg.trace.shift_s)
    seen_loads, seen_unloads = residency_changes(samples)
    if router is not None:
        loads, unloads, preloads = router.loads + router.preloads, router.unloads, router.preloads
        waited, wait_mean = s.waited, _mean([r.load_wait_s for r in records])
    else:
        assert gw is not None
        loads, unloads, preloads = gw.loads, gw.unloads, 0
        waited = gw.waited
        wait_mean = gw.wait_sum_wall_s * cfg.speed / gw.waited if gw.waited else 0.0
    spread_values = [v for v in spread.values() if v is not None]
    return {
        "ttft_p50_s": s.ttft_p50_s,
        "ttft_p99_s": s.ttft_p99_s,
        "itl_p50_s": s.itl_p50_s,
        "itl_p99_s": s.itl_p99_s,
        "tok_s": s.tok_s,
        "loads": loads,
        "unloads": unloads,
        "churn": loads + unloads,
        "preloads": preloads,
        "requests": s.requests,
        "ok": s.ok,
        "failed": s.requests - s.ok,
        "retried": sum(1 for r in records if r.retries),
        "errors": dict(Counter(r.error for r in records if r.error).most_common(5)),
        "waited": waited,
        "wait_mean_s": wait_mean,
        "wait_p50_s": s.wait_p50_s if router is not None else None,
        "wait_max_s": s.wait_max_s if router is not None else None,
        "hot_after_shift": list(hot),
        "spread_s": spread,
        "spread_max_s": max(spread_values) if len(spread_values) == len(spread) else None,
        "residency_seen": {"loads": seen_loads, "unloads": seen_unloads},
        # Most adapters one engine listed at once: above max_loras means over-commit.
        "max_resident": max((len(h) for x in samples for h in x.engines.values()), default=0),
        "final_residency": {e: sorted(a) for e, a in samples[-1].engines.items()}
        if samples
        else {},
        "hot_rates_after_shift": {a: adapter_rates(cfg.trace, 1)[a] for a in hot},
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("log_dir", "extra_lora")},
    }


def _mean(values: list[float | None]) -> float:
    xs = [v for v in values if v is not None]
    return math.fsum(xs) / len(xs) if xs else 0.0
