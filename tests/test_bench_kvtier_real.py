"""benchmarks/kvtier/real.py's pure parts: the documents and a contender's summary row (the run
itself needs real engines: ``python -m benchmarks.kvtier.real --quick``)."""

from __future__ import annotations

import pytest

from benchmarks.kvtier.real import document, summarize


def test_documents_are_counting_sequences_that_share_no_block() -> None:
    a, b = document(0, 5), document(1, 5)
    assert a == "10000, 10001, 10002, 10003, 10004,"
    assert b.startswith("20000,")
    assert a[:6] != b[:6]  # their first blocks differ, so their chained block hashes do


def test_summarize_one_contender() -> None:
    row = summarize(
        "tier",
        [0.2, 0.4, 3.0],
        errors=1,
        wall_s=10.0,
        tokens=2000,
        prompt_tokens=1950,
        deltas={"local_compute": 700.0, "local_cache_hit": 640.0, "tier_loaded": 610.0},
    )
    assert row.requests == 4
    assert row.ttft_mean_s == pytest.approx(3.6 / 3)
    assert row.ttft_p50_s == 0.4
    assert row.throughput_tok_s == 200.0
    assert (row.computed_prompt_tokens, row.local_hit_tokens, row.external_hit_tokens) == (
        700,
        640,
        610,
    )


def test_summarize_without_answers() -> None:
    row = summarize("no-tier", [], errors=2, wall_s=0.0, tokens=0, prompt_tokens=0, deltas={})
    assert (row.requests, row.ttft_mean_s, row.ttft_p50_s, row.throughput_tok_s) == (2, 0, 0, 0)
    assert row.computed_prompt_tokens == 0
