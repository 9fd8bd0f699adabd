"""The KV-tier benchmark's pure parts: workload, derived profile, summaries, targets, report."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.kvtier.report import markdown_table, targets, write_json, write_plot
from benchmarks.kvtier.runner import CONTENDERS, derived_profile, summarize_run
from benchmarks.kvtier.workload import QUICK, generate, working_set_tokens
from benchmarks.routing.loadgen import Result
from enginesim.core.profile import load_profile


def test_workload_is_seeded_ordered_and_sessions_chain() -> None:
    spec = replace(QUICK, duration_s=20.0)
    reqs = generate(spec, seed=3)
    assert reqs == generate(spec, seed=3)
    assert reqs != generate(spec, seed=4)
    assert [r.idx for r in reqs] == list(range(len(reqs)))
    assert all(a.at_s <= b.at_s for a, b in zip(reqs, reqs[1:], strict=False))
    rag = [r for r in reqs if r.kind == "rag"]
    turns = [r for r in reqs if r.kind == "multi-turn"]
    assert rag and turns
    assert all(r.depends_on is None for r in rag)
    for r in turns:
        if r.depends_on is not None:
            prev = reqs[r.depends_on]
            assert prev.session == r.session and prev.idx < r.idx
            # a turn resends the conversation so far: the previous prompt is its prefix
            assert r.messages[: len(prev.messages)] == prev.messages
    docs = {r.messages[0][1] for r in rag}
    assert 1 < len(docs) <= spec.groups
    assert all(len(r.messages[0][1].split()) > spec.doc_words for r in rag)


def test_working_set_exceeds_the_derived_kv_cache() -> None:
    profile = load_profile("llama3-8b-a10g")
    per_engine = 640 * profile.block_size
    assert working_set_tokens(QUICK) > 4 * per_engine * 2


def test_derived_profile_overrides_only_the_kv_blocks(tmp_path: Path) -> None:
    path = derived_profile("llama3-8b-a10g", 640, tmp_path)
    p, base = load_profile(path), load_profile("llama3-8b-a10g")
    assert p.num_gpu_blocks == 640 and base.num_gpu_blocks > 640
    assert replace(p, name=base.name, num_gpu_blocks=base.num_gpu_blocks, notes=base.notes) == base
    assert load_profile(derived_profile("llama3-8b-a10g", None, tmp_path)) == base


def _result(idx: int, sent: float, ttft: float, e2e: float, tokens: int) -> Result:
    return Result(idx=idx, kind="rag", sent_at=sent, ttft_s=ttft, e2e_s=e2e,
                  output_tokens=tokens, status=200)  # fmt: skip


def test_summary_in_simulated_seconds() -> None:
    results = [_result(0, 0.0, 0.5, 1.0, 10), _result(1, 1.0, 1.5, 1.0, 10),
               Result(idx=2, kind="rag", error="timeout")]  # fmt: skip
    counters = {"prompt_tokens": 100.0, "local_compute": 25.0}
    s = summarize_run(results, speed=2.0, counters=counters)
    assert s["throughput_tok_s"] == 20 / (2.0 * 2.0)  # 20 tokens over 2 wall s = 4 sim s
    assert s["ttft_mean_s"] == 2.0 and s["ttft_p99_s"] == 3.0 and s["ttft_p50_s"] == 1.0
    assert (s["ok"], s["requests"], s["errors"]) == (2, 3, {"timeout": 1})
    assert s["computed_fraction"] == 0.25
    empty = summarize_run([], speed=1.0, counters={})
    assert empty["throughput_tok_s"] == 0.0 and math.isnan(empty["ttft_mean_s"])


def _row(tput: float, mean: float, p99: float) -> dict[str, float]:
    return {"throughput_tok_s": tput, "ttft_mean_s": mean, "ttft_p99_s": p99}


@pytest.mark.parametrize(
    ("rows", "gain", "ratio", "met"),
    [
        (
            {"no-tier-round-robin": _row(50, 8, 20), "no-tier-prefix-cache": _row(100, 4, 10),
             "tier-round-robin": _row(120, 2, 5), "tier-prefix-cache": _row(160, 1, 3)},
            0.6, 0.25, (True, True),
        ),
        (
            {"no-tier-prefix-cache": _row(100, 4, 10), "tier-prefix-cache": _row(120, 2, 5)},
            0.2, 0.5, (False, False),
        ),
    ],
)  # fmt: skip
def test_targets_compare_best_routing_each_side(
    rows: dict[str, dict[str, float]], gain: float, ratio: float, met: tuple[bool, bool]
) -> None:
    t = targets(rows)
    assert t["throughput_gain"] == pytest.approx(gain)
    assert t["ttft_mean_ratio"] == pytest.approx(ratio)
    assert (t["throughput_met"], t["ttft_met"]) == met
    assert targets({"tier-prefix-cache": _row(1, 1, 1)}) == {"complete": False}


def test_targets_break_throughput_ties_on_ttft() -> None:
    rows = {"no-tier-prefix-cache": _row(100, 4, 10), "tier-round-robin": _row(200.5, 2, 8),
            "tier-prefix-cache": _row(200, 0.4, 0.6)}  # fmt: skip
    t = targets(rows)
    assert t["tier"] == "tier-prefix-cache"
    assert t["ttft_mean_ratio"] == pytest.approx(0.1)


def test_report_files(tmp_path: Path) -> None:
    rows = {c.name: {**_row(10.0 + i, 1.0, 2.0), "ok": 3, "requests": 4,
                     "engine": {"prompt_tokens": 10.0, "local_compute": 5.0}}
            for i, c in enumerate(CONTENDERS)}  # fmt: skip
    write_json(tmp_path / "out.json", {"sim": rows, "x": float("nan")})
    doc = json.loads((tmp_path / "out.json").read_text())
    assert set(doc["sim"]) == {c.name for c in CONTENDERS} and doc["x"] is None
    for row in doc["sim"].values():
        assert {"throughput_tok_s", "ttft_mean_s", "ttft_p99_s"} <= set(row)
    assert write_plot(tmp_path / "out.png", rows).stat().st_size > 0
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 50% |" in table
