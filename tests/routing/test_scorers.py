"""Table tests for the simple scorers: least-kv-cache, least-latency, token-load."""

from __future__ import annotations

from typing import Any

import pytest

from routing.registry import builtin_plugins
from routing.scorers.kv_cache import LeastKvCache
from routing.scorers.latency import LeastLatency
from routing.scorers.least_request import LeastRequest
from routing.scorers.token_load import TokenLoad
from routing.types import RouteRequest
from tests.routing.helpers import ep

REQ = RouteRequest(model="m")


@pytest.mark.parametrize(
    ("usages", "expected"),
    [([0.2, 0.9], [0.8, 0.1]), ([0.0, 0.0], [1.0, 1.0]), ([1.5, -0.1], [0.0, 1.0]), ([], [])],
)
def test_least_kv_cache(usages: list[float], expected: list[float]) -> None:
    eps = [ep(f"e{i}", kv_usage=u) for i, u in enumerate(usages)]
    assert LeastKvCache().score(REQ, eps) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ttft", "itl", "max_tokens", "expected"),
    [
        ([0.1, 0.3], [0.01, 0.01], 10, [1.0, 0.5]),
        ([None, None], [None, None], 10, [1.0, 1.0]),
        ([0.2, None], [0.01, None], 0, [1.0, 1.0]),  # unknown gets the known mean
        ([0.1, 0.1], [0.01, 0.03], 100, [1.0, 1.1 / 3.1]),
        ([0.0, 0.0], [0.0, 0.0], None, [1.0, 1.0]),  # floor avoids division by zero
    ],
)
def test_least_latency(
    ttft: list[float | None], itl: list[float | None], max_tokens: int | None, expected: list[float]
) -> None:
    eps = [
        ep(f"e{i}", ttft_ewma_s=t, itl_ewma_s=i_)
        for i, (t, i_) in enumerate(zip(ttft, itl, strict=True))
    ]
    req = RouteRequest(model="m", max_tokens=max_tokens)
    assert LeastLatency().score(req, eps) == pytest.approx(expected)


def test_least_latency_default_output_tokens() -> None:
    eps = [ep("a", ttft_ewma_s=0.1, itl_ewma_s=0.0), ep("b", ttft_ewma_s=0.0, itl_ewma_s=0.001)]
    # b: 0.001 * 256 = 0.256 s vs a: 0.1 s
    assert LeastLatency().score(REQ, eps) == pytest.approx([1.0, 0.1 / 0.256])


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [([0, 5000], [1.0, 0.0]), ([0, 0], [1.0, 1.0]), ([1000, 4000], [0.75, 0.0]), ([], [])],
)
def test_token_load(tokens: list[int], expected: list[float]) -> None:
    eps = [ep(f"e{i}", in_flight_tokens=t) for i, t in enumerate(tokens)]
    assert TokenLoad().score(REQ, eps) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ([{"in_flight": 0}, {"in_flight": 4}], [1.0, 0.0]),
        ([{"running": 2, "waiting": 2}, {"in_flight": 1}], [0.0, 0.75]),
        ([{}, {}], [1.0, 1.0]),
    ],
)
def test_least_request(kw: list[dict[str, Any]], expected: list[float]) -> None:
    eps = [ep(f"e{i}", **k) for i, k in enumerate(kw)]
    assert LeastRequest().score(REQ, eps) == pytest.approx(expected)


@pytest.mark.parametrize("kind", sorted(builtin_plugins().scorers))
def test_every_builtin_scorer_answers_no_candidates_with_no_scores(kind: str) -> None:
    scorer = builtin_plugins().scorers[kind]()
    req = RouteRequest(model="m", prompt_tokens=64, block_tokens=16, block_hashes=(1, 2, 3, 4))
    assert scorer.score(req, []) == []
    explain = getattr(scorer, "explain", None)
    assert explain is None or explain(req, []) == []
