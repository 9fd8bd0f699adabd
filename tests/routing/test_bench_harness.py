"""The routing benchmark's pure pieces: workloads, load client, in-process router, report."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import orjson
import pytest

from benchmarks.routing.inproc import InProcRouter
from benchmarks.routing.loadgen import FixedTarget, Result, run_load
from benchmarks.routing.oracle import cached_fractions, idle_ttft_s, oracle
from benchmarks.routing.report import check_targets, pct, summarize
from benchmarks.routing.workloads import WORKLOADS, WorkloadSpec, generate, group_sizes
from enginesim.core.profile import load_profile
from routing.metrics_parser import EngineMetrics
from routing.registry import builtin_policies

SMALL = WorkloadSpec(
    groups=4, per_group=3, system_words=300, question_words=20, shared_output=4,
    sessions=3, turns=3, shared_system_words=0, session_system_words=50, turn_words=10,
    reply_words=10,
    turn_output=4, think_s=0.01, unique=6, unique_words=40, unique_output=4,
)  # fmt: skip


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    "kind", ["shared-prefix", "shared-prefix-zipf", "multi-turn", "unique", "mix"]
)
def test_workloads_are_seeded_ordered_and_consistent(kind: str) -> None:
    a = generate(kind, SMALL, rate=5.0, seed=1)
    assert a == generate(kind, SMALL, rate=5.0, seed=1)
    assert a != generate(kind, SMALL, rate=5.0, seed=2)
    assert [r.idx for r in a] == list(range(len(a)))
    assert all(x.at_s <= y.at_s for x, y in zip(a, a[1:], strict=False))
    for r in a:
        if r.depends_on is not None:
            prev = a[r.depends_on]
            assert prev.session == r.session and r.depends_on < r.idx
            # the next turn repeats the previous conversation as its prefix
            assert r.messages[: len(prev.messages)] == prev.messages


def test_workload_shapes() -> None:
    shared = generate("shared-prefix", SMALL, rate=1.0)
    assert len(shared) == 12 and len({r.messages[0] for r in shared}) == 4
    assert len(generate("multi-turn", SMALL, rate=1.0)) == 9
    unique = generate("unique", SMALL, rate=1.0)
    assert len({r.messages[0][1][:30] for r in unique}) == 6
    assert {r.kind for r in generate("mix", WORKLOADS["quick"], rate=1.0)} == {
        "shared-prefix", "multi-turn", "unique",
    }  # fmt: skip
    zipf = Counter(r.messages[0] for r in generate("shared-prefix-zipf", SMALL, rate=1.0))
    assert sorted(zipf.values()) == sorted(group_sizes(4, 12, SMALL.zipf_s))
    with pytest.raises(ValueError):
        generate("nope", SMALL, rate=1.0)
    with pytest.raises(ValueError):
        generate("unique", SMALL, rate=0.0)


@pytest.mark.parametrize(
    ("groups", "total", "s", "expected"),
    [
        (4, 8, 0.0, [2, 2, 2, 2]),  # uniform
        (4, 12, 1.0, [5, 3, 2, 2]),  # 1 + 8 x (0.48, 0.24, 0.16, 0.12), largest remainders
        (3, 3, 2.0, [1, 1, 1]),  # every group keeps one request
        (16, 256, 1.0, [72, 37, 25, 19, 15, 13, 11, 10, 9, 8, 7, 7, 6, 6, 6, 5]),
    ],
)
def test_group_sizes(groups: int, total: int, s: float, expected: list[int]) -> None:
    assert group_sizes(groups, total, s) == expected
    with pytest.raises(ValueError):
        group_sizes(groups, groups - 1, s)


def _sse(tokens: int, prompt_tokens: int) -> list[bytes]:
    chunks = [b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n']
    chunks += [
        b"data: " + orjson.dumps({"choices": [{"delta": {"content": f"t{i} "}}]}) + b"\n\n"
        for i in range(tokens)
    ]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens}
    chunks.append(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def _transport(seen: list[dict[str, object]]) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        seen.append({"url": str(request.url), "body": body, "headers": dict(request.headers)})
        if body.get("user") == "user-u1":
            return httpx.Response(503, json={"error": {"message": "busy"}})
        if body.get("user") == "user-u2":
            err = b'data: {"error": {"message": "boom"}}\n\n'
            return httpx.Response(200, content=_aiter([err]))
        return httpx.Response(200, content=_aiter(_sse(body["max_tokens"], 42)))

    return httpx.MockTransport(handler)


async def _aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


@pytest.mark.anyio
async def test_load_client_measures_streams_and_errors() -> None:
    seen: list[dict[str, object]] = []
    requests = generate("unique", SMALL, rate=1000.0)
    results, info = await run_load(
        requests, FixedTarget("http://gw", headers={"x-switchyard-routing": "p"}),
        model="m", speed=1.0, max_duration_s=30.0, transport=_transport(seen),
    )  # fmt: skip
    by_user = {req.user: res for req, res in zip(requests, results, strict=True)}
    good = by_user["user-u0"]
    assert good.ok and good.ttft_s is not None and len(good.itls_s) == 3
    assert (good.output_tokens, good.prompt_tokens) == (4, 42)
    assert by_user["user-u1"].error is not None and by_user["user-u1"].status == 503
    assert by_user["user-u2"].error is not None and "boom" in by_user["user-u2"].error
    assert sum(r.ok for r in results) == 4 and info["not_sent"] == 0
    assert all(s["headers"]["x-switchyard-routing"] == "p" for s in seen)  # type: ignore[index]
    assert seen[0]["body"]["stream_options"] == {"include_usage": True}  # type: ignore[index]


@pytest.mark.anyio
async def test_multi_turn_waits_for_previous_turn_and_inproc_routes_sticky() -> None:
    seen: list[dict[str, object]] = []
    requests = generate("multi-turn", SMALL, rate=1000.0)
    router = InProcRouter(
        builtin_policies()["prefix-cache"](),
        {"e0": "http://e0", "e1": "http://e1", "e2": "http://e2"},
        model="m",
    )
    results, _ = await run_load(
        requests, router, model="m", speed=1.0, max_duration_s=30.0,
        transport=_transport(seen),
    )  # fmt: skip
    assert all(r.ok for r in results)
    order = [s["body"]["messages"] for s in seen]  # type: ignore[index]
    for r in requests:
        if r.depends_on is not None:
            prev = [{"role": a, "content": b} for a, b in requests[r.depends_on].messages]
            cur = [{"role": a, "content": b} for a, b in r.messages]
            assert order.index(prev) < order.index(cur)
    # every later turn of a session goes where its earlier turns went (its prefix is there)
    engine_of: dict[object, set[str]] = {}
    for s in seen:
        session = s["headers"]["x-session-id"]  # type: ignore[index]
        engine_of.setdefault(session, set()).add(str(s["url"]).split("/v1")[0])
    assert all(len(v) == 1 for v in engine_of.values())
    assert all(st.snapshot().in_flight == 0 for st in router.states.values())
    assert router.index.stats().pairs > 0 and len(router.route_s) == len(requests)


def test_summarize_and_targets() -> None:
    results = [
        Result(idx=i, kind="unique", sent_at=float(i), ttft_s=0.01 * (i + 1), itls_s=[0.002],
               e2e_s=1.0, output_tokens=10, status=200)
        for i in range(10)
    ] + [Result(idx=10, kind="unique", error="timeout")]  # fmt: skip
    before = {"e0": EngineMetrics(), "e1": EngineMetrics()}
    after = {
        "e0": EngineMetrics(prefix_hits=30, prefix_queries=100, requests_finished=6),
        "e1": EngineMetrics(prefix_hits=10, prefix_queries=100, requests_finished=4),
    }
    row = summarize(
        workload="unique", contender="inproc:prefix-cache", rate_rps=1.0, fraction=0.8,
        results=results, speed=10.0, before=before, after=after,
    )  # fmt: skip
    assert (row.ok, row.requests, row.errors) == (10, 11, {"timeout": 1})
    assert row.ttft_p50_s == pytest.approx(0.5) and row.ttft_p99_s == pytest.approx(1.0)
    assert row.itl_p50_s == pytest.approx(0.02)
    assert row.engine_hit_rate == pytest.approx(0.2)
    assert row.load_split == [0.6, 0.4] and row.load_split_max_dev == pytest.approx(0.2)
    assert row.output_tok_per_s == pytest.approx(100 / 100)
    lr = summarize(
        workload="unique", contender="inproc:least-request", rate_rps=1.0, fraction=0.8,
        results=results, speed=5.0, before=before, after=after,
    )  # fmt: skip
    targets = {t["target"]: t["met"] for t in check_targets([row, lr], ours=row.contender)}
    assert targets == {
        "p90 within 5% of least-request": False,
        "tok/s within 5% of least-request": False,  # 1.0 vs 0.95 x 2.0
        "load split within +-10%": False,
    }


def test_targets_cache_workloads_table() -> None:
    from dataclasses import replace as dc_replace

    base = summarize(
        workload="shared-prefix", contender="x", rate_rps=1.0, fraction=0.8, results=[],
        speed=1.0, before={}, after={},
    )  # fmt: skip
    cases = [  # (ours p90, tok/s, hit), expected met per target
        ((0.2, 110.0, 0.65), {"rr": True, "peer": True, "tps": True, "hit": True}),
        ((0.3, 99.0, 0.62), {"rr": False, "peer": False, "tps": False, "hit": False}),
    ]
    names = {
        "p90 <= 0.5x round-robin": "rr",
        "p90 <= 0.8x better peer": "peer",
        "output tok/s >= every peer": "tps",
        "hit rate within 10% of oracle": "hit",
    }
    for (p90, tps, hit), expected in cases:
        rows = [
            dc_replace(base, contender="ours", ttft_p90_s=p90, output_tok_per_s=tps,
                       engine_hit_rate=hit),
            dc_replace(base, contender="inproc:round-robin", ttft_p90_s=0.5),
            dc_replace(base, contender="sglang-router:cache_aware", ttft_p90_s=0.3,
                       output_tok_per_s=100.0),
            dc_replace(base, contender="vllm-router:cache_aware", ttft_p90_s=0.4,
                       output_tok_per_s=90.0),
            dc_replace(base, contender="oracle", engine_hit_rate=0.7),
        ]  # fmt: skip
        got = {names[t["target"]]: t["met"] for t in check_targets(rows, ours="ours")}
        assert got == expected, (p90, tps, hit)


def test_pct() -> None:
    assert pct([], 50) is None
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct([1.0, 2.0], 100) == 2.0


def test_oracle_bounds() -> None:
    profile = load_profile("llama3-8b-a100")
    requests = generate("shared-prefix", SMALL, rate=1.0)
    fractions = cached_fractions(requests, "m")
    firsts: dict[object, float] = {}
    for r, f in zip(requests, fractions, strict=True):
        firsts.setdefault(r.messages[0], f)
    assert all(f == 0.0 for f in firsts.values())  # the first of each group is cold
    assert sum(f > 0.5 for f in fractions) == len(requests) - 4
    assert idle_ttft_s(profile, 4000, 0) > idle_ttft_s(profile, 4000, 3200) > 0
    rows = oracle(requests, [500] * len(requests), profile=profile, model="m")
    assert all(o.cached_tokens % profile.block_size == 0 for o in rows)


def test_median_run_picks_the_median_p90_round() -> None:
    from dataclasses import replace as dc_replace

    from benchmarks.routing.runner import median_run

    base = summarize(
        workload="w", contender="c", rate_rps=1.0, fraction=0.5, results=[], speed=1.0,
        before={}, after={},
    )  # fmt: skip
    runs = [dc_replace(base, ttft_p90_s=v) for v in (0.3, None, 0.1, 0.2)]
    chosen = median_run(runs)
    assert chosen.ttft_p90_s == 0.2
    assert [r["ttft_p90_s"] for r in chosen.extra["rounds"]] == [0.3, None, 0.1, 0.2]
    assert chosen.extra["spread"]["ttft_p90_s"] == [0.1, 0.3]
    tps = [
        dc_replace(base, ttft_p90_s=0.1 * i, output_tok_per_s=t) for i, t in enumerate((5, 1, 3))
    ]
    mixed = median_run(tps)  # each metric its own median
    assert (mixed.ttft_p90_s, mixed.output_tok_per_s) == (0.1, 3)
    assert mixed.extra["spread"]["output_tok_per_s"] == [1, 5]
    cpu = [dc_replace(base, extra={"router_cpu_s": c}) for c in (4.0, 2.0, 9.0)]
    assert median_run(cpu).extra["router_cpu_s"] == 4.0
    assert "router_cpu_s" not in median_run(runs).extra  # in-process contenders: none


def test_proc_cpu_counts_its_process_group_and_reaped_children(tmp_path: Path) -> None:
    import sys
    import time

    from benchmarks.routing.launch import spawn

    # A child burns CPU and is reaped; the leader then idles. Neither is this test's process.
    script = (
        "import subprocess, sys, time\n"
        "subprocess.run([sys.executable, '-c', 'sum(range(60_000_000))'], check=True)\n"
        "print('done', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = spawn("burner", [sys.executable, "-c", script], tmp_path)
    try:
        deadline = time.monotonic() + 60
        while "done" not in proc.tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "done" in proc.tail()
        used = proc.cpu_s()
        assert used is not None and used >= 0.2  # sum(range(6e7)): over 0.5 s of CPU here
    finally:
        proc.stop()


def test_multi_turn_sessions_share_one_system_prompt_then_their_own_history() -> None:
    spec = replace(SMALL, shared_system_words=30)
    systems = {r.messages[0][1] for r in generate("multi-turn", spec, rate=1.0)}
    assert len(systems) == spec.sessions
    assert len({" ".join(s.split()[:30]) for s in systems}) == 1
    assert len({" ".join(s.split()[30:]) for s in systems}) == spec.sessions
