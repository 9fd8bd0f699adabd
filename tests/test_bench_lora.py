"""The LoRA benchmark's pure parts (Zipf trace, popularity shift, churn and spread counting,
percentiles, the density search, the targets) and the baselines' router against a fake engine
that records every load and unload."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web

from benchmarks.lora.density import dedicated_engines, meets_slo, search_min
from benchmarks.lora.metrics import (
    RequestRecord,
    ResidencySample,
    percentile,
    residency_changes,
    spread_times,
    summarize,
)
from benchmarks.lora.report import check_targets
from benchmarks.lora.router import ClientRouter, RouteError
from benchmarks.lora.runner import CONTENDERS, GATEWAY_PRELOAD, RunConfig
from benchmarks.lora.traces import (
    TraceConfig,
    adapter_rates,
    hot_adapters,
    make_trace,
    rank_of,
    zipf_weights,
)
from benchmarks.ports import free_port
from routing.lora import PlacementSettings


def test_zipf_weights_normalised_and_decreasing() -> None:
    w = zipf_weights(50, 1.0)
    assert math.isclose(sum(w), 1.0)
    assert all(a > b for a, b in zip(w, w[1:], strict=False))
    assert math.isclose(w[0] / w[9], 10.0)
    assert zipf_weights(4, 0.0) == [0.25] * 4


def test_shift_rotates_the_ranking() -> None:
    cfg = TraceConfig(n_adapters=50)
    assert [rank_of(cfg, i, 0) for i in (0, 1, 25, 49)] == [0, 1, 25, 49]
    assert [rank_of(cfg, i, 1) for i in (25, 26, 0, 24)] == [0, 1, 25, 49]
    assert hot_adapters(cfg, phase=0, k=2) == ("adapter-00", "adapter-01")
    assert hot_adapters(cfg, phase=1, k=2) == ("adapter-25", "adapter-26")
    rates = adapter_rates(TraceConfig(rate=20.0), 1)
    assert math.isclose(sum(rates.values()), 20.0)
    assert max(rates, key=rates.__getitem__) == "adapter-25"


def test_trace_is_seeded_open_loop_and_shifts() -> None:
    cfg = TraceConfig(rate=20.0, duration_s=200.0, seed=3)
    trace = make_trace(cfg)
    assert trace == make_trace(cfg)
    assert trace != make_trace(TraceConfig(rate=20.0, duration_s=200.0, seed=4))
    times = [r.at_s for r in trace]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 200.0
    assert 0.9 * 4000 < len(trace) < 1.1 * 4000
    assert all(r.phase == (1 if r.at_s >= 100.0 else 0) for r in trace)
    assert all(192 <= r.prompt_tokens <= 320 and 24 <= r.max_tokens <= 40 for r in trace)
    before = Counter(r.adapter for r in trace if r.phase == 0)
    after = Counter(r.adapter for r in trace if r.phase == 1)
    assert before.most_common(1)[0][0] == "adapter-00"
    assert after.most_common(1)[0][0] == "adapter-25"
    # Zipf(1) over 50: the top adapter draws ~22 % of its phase.
    assert 0.18 < after["adapter-25"] / sum(after.values()) < 0.26


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 50, math.nan), ([3.0], 99, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
     ([float(i) for i in range(101)], 99, 99.0)],
)  # fmt: skip
def test_percentile(values: list[float], q: float, expected: float) -> None:
    got = percentile(values, q)
    assert (math.isnan(got) and math.isnan(expected)) or math.isclose(got, expected)


def test_summarize_counts_failures_at_the_timeout() -> None:
    ok = [RequestRecord(float(i), "a", 0.1, 0.01, 10, True) for i in range(98)]
    failed = [RequestRecord(99.0, "a", None, None, 0, False, error="http 503")] * 2
    waited = [RequestRecord(1.0, "b", 0.6, 0.01, 10, True, load_wait_s=0.5)]
    s = summarize(ok + failed + waited, duration_s=10.0, timeout_ttft_s=120.0)
    assert (s.requests, s.ok, s.waited) == (101, 99, 1)
    assert s.ttft_p50_s == pytest.approx(0.1) and s.ttft_p99_s == pytest.approx(120.0)
    assert s.tok_s == pytest.approx(99.0) and s.wait_max_s == 0.5


def _sample(t: float, **engines: str) -> ResidencySample:
    return ResidencySample(t, {e: frozenset(a.split(",")) - {""} for e, a in engines.items()})


def test_residency_changes_and_spread_times() -> None:
    samples = [
        _sample(0.0, e0="", e1=""),
        _sample(10.0, e0="a", e1="b"),
        _sample(55.0, e0="a,c", e1="b"),
        _sample(62.0, e0="a,c", e1="c"),
        _sample(75.0, e0="c", e1="c,a"),
    ]
    assert residency_changes(samples) == (5, 2)  # a, b, c, c, a loaded; b, a unloaded
    assert spread_times(samples, ["c", "a", "b"], after_s=60.0) == {
        "c": pytest.approx(2.0),
        "a": None,  # on two engines only at 10..55 (before the shift) and never after
        "b": None,
    }
    assert spread_times(samples, ["a"], after_s=0.0, min_engines=1) == {"a": 10.0}


@pytest.mark.parametrize("need", [1, 2, 3, 5, 7, 8, 16])
def test_search_min_finds_the_smallest_passing_count(need: int) -> None:
    probed: list[int] = []

    def ok(n: int) -> bool:
        probed.append(n)
        return n >= need

    assert search_min(ok, hi_limit=16) == need
    assert len(probed) == len(set(probed)) <= 2 * math.ceil(math.log2(16)) + 1


def test_search_min_gives_up_at_the_limit() -> None:
    assert search_min(lambda n: n >= 20, hi_limit=12) is None


def test_dedicated_engines_and_slo() -> None:
    assert dedicated_engines({"a": 0.1, "b": 0.2}, cap1=8.0) == 2
    assert dedicated_engines({"a": 20.0, "b": 0.2}, cap1=8.0) == 4
    row = {"failed": 0, "ttft_p99_s": 1.9, "itl_p99_s": 0.05}
    assert meets_slo(row, ttft_slo_s=2.0, itl_slo_s=0.1)
    assert not meets_slo({**row, "failed": 1}, ttft_slo_s=2.0, itl_slo_s=0.1)
    assert not meets_slo({**row, "itl_p99_s": math.nan}, ttft_slo_s=2.0, itl_slo_s=0.1)


def test_targets() -> None:
    def row(ttft: float, churn: int, tok: float, spread: float | None) -> dict[str, object]:
        return {"ttft_p99_s": ttft, "churn": churn, "tok_s": tok, "spread_max_s": spread}

    rows = {
        "random-ondemand": row(1.0, 1000, 600.0, 2.0),
        "static": row(0.2, 0, 601.0, None),
        "switchyard": row(0.4, 250, 600.0, 12.0),
    }
    t = check_targets(rows)
    assert t["ttft_p99_ok"] and t["churn_ok"] and t["tok_s_ok"] and t["spread_ok"]
    assert t["churn_vs_random"] == pytest.approx(0.25)
    rows["switchyard"] = row(0.6, 400, 500.0, None)
    t = check_targets(rows)
    assert not (t["ttft_p99_ok"] or t["churn_ok"] or t["tok_s_ok"] or t["spread_ok"])
    assert check_targets(rows, ours="switchyard-cold") == {}  # did not run
    # The cold contender is checked on its own, against every other row (ours included).
    rows["switchyard-cold"] = row(0.45, 400, 601.0, 20.0)
    cold = check_targets(rows, ours="switchyard-cold")
    assert cold["ttft_p99_ok"] and cold["tok_s_ok"] and cold["spread_ok"]
    assert not cold["churn_ok"] and cold["ttft_p99_vs_random"] == pytest.approx(0.45)
    assert check_targets(rows)["tok_s_vs_best_other"] == pytest.approx(500.0 / 601.0)


def test_gateway_contenders_and_their_preload(tmp_path: Path) -> None:
    """`switchyard` preloads, the gateway's default (and waits for it before the trace);
    `switchyard-cold` does not; both go through the gateway with the same other knobs."""
    assert {n for n, mode in CONTENDERS.items() if mode is None} == set(GATEWAY_PRELOAD)
    assert GATEWAY_PRELOAD == {"switchyard": True, "switchyard-cold": False}
    cfg = RunConfig(log_dir=tmp_path, speed=3.0)
    warm, cold = cfg.gateway_lora(preload=True), cfg.gateway_lora(preload=False)
    assert warm["placement"]["preload"] is True and cold["placement"]["preload"] is False
    assert {**cold, "placement": {}} == {**warm, "placement": {}}
    assert {**cold["placement"], "preload": True} == warm["placement"]
    assert cfg.gateway_lora() == warm
    # the gateway's own default is what `switchyard` runs
    assert PlacementSettings().preload is True


class FakeEngine:
    """Load/unload endpoints that record calls; a load takes ``load_s``."""

    def __init__(self, load_s: float = 0.05) -> None:
        self.load_s = load_s
        self.calls: list[tuple[str, str]] = []
        self.held: set[str] = set()

    async def load(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        self.calls.append(("load", name))
        await anyio.sleep(self.load_s)
        if name in self.held:
            return web.Response(status=400, text="already loaded")
        self.held.add(name)
        return web.Response(text="ok")

    async def unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        self.calls.append(("unload", name))
        self.held.discard(name)
        return web.Response(text="ok")


@pytest.fixture
async def engine() -> AsyncIterator[tuple[FakeEngine, str]]:
    fake = FakeEngine()
    app = web.Application()
    app.router.add_post("/v1/load_lora_adapter", fake.load)
    app.router.add_post("/v1/unload_lora_adapter", fake.unload)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


PATHS = {f"a{i}": f"/adapters/a{i}" for i in range(6)}


@pytest.mark.anyio
async def test_router_coalesces_loads_and_evicts_lru_idle(engine: tuple[FakeEngine, str]) -> None:
    fake, url = engine
    async with aiohttp.ClientSession() as session:
        router = ClientRouter([url], mode="random", max_loras=2, paths=PATHS, session=session)
        waits: list[float | None] = []

        async def use(adapter: str, hold_s: float = 0.0) -> None:
            async with router.route(adapter) as (got, waited):
                assert got == url
                waits.append(waited)
                await anyio.sleep(hold_s)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(use, "a0")
        assert fake.calls == [("load", "a0")]  # five first requests, one load
        assert sum(1 for w in waits if w is not None) == 5 and router.loads == 1
        await use("a1")
        await use("a0")  # a1 is now the least recently used
        await use("a2")
        assert fake.calls[-2:] == [("unload", "a1"), ("load", "a2")]
        assert fake.held == {"a0", "a2"}
        await use("a0")
        assert (router.loads, router.unloads) == (3, 1)

        # An adapter with a request in flight is never the victim: a3 evicts a2, not a0.
        async with anyio.create_task_group() as tg:
            tg.start_soon(use, "a0", 0.3)
            await anyio.sleep(0.05)
            await use("a2")
            await use("a3")
        assert fake.calls[-2:] == [("unload", "a2"), ("load", "a3")]


@pytest.mark.anyio
async def test_router_more_pending_loads_than_slots_all_complete(
    engine: tuple[FakeEngine, str],
) -> None:
    """Five different adapters asked at once on a 2-slot engine: loads waiting for room never
    block each other (each one that gets a slot loads, the rest evict idle adapters)."""
    fake, url = engine
    async with aiohttp.ClientSession() as session:
        router = ClientRouter([url], mode="random", max_loras=2, paths=PATHS, session=session,
                              slot_wait_s=5.0)  # fmt: skip

        async def use(adapter: str) -> None:
            async with router.route(adapter):
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(use, f"a{i}")
        assert (router.loads, router.unloads, router.load_failures) == (5, 3, 0)
        assert len(fake.held) == 2


@pytest.mark.anyio
async def test_router_static_preloads_and_never_loads_after(
    engine: tuple[FakeEngine, str],
) -> None:
    fake, url = engine
    async with aiohttp.ClientSession() as session:
        router = ClientRouter([url, url], mode="static", max_loras=1, paths=PATHS, session=session)
        await router.preload(["a0", "a1", "a2"])
        assert router.preloads == 3 and fake.held == {"a0", "a1", "a2"}
        async with router.route("a2") as (_, waited):
            assert waited is None
        assert (router.loads, router.unloads) == (0, 0)
        with pytest.raises(RouteError):
            async with router.route("a5"):
                pass


@pytest.mark.anyio
async def test_router_slot_wait_is_bounded(engine: tuple[FakeEngine, str]) -> None:
    _, url = engine
    async with aiohttp.ClientSession() as session:
        router = ClientRouter([url], mode="least-request", max_loras=1, paths=PATHS,
                              session=session, slot_wait_s=0.2)  # fmt: skip
        async with router.route("a0"):
            with pytest.raises(RouteError, match="no free LoRA slot"):
                async with router.route("a1"):
                    pass
        assert router.load_failures == 1
