from __future__ import annotations

import math

import pytest

from kvcache.breakeven import BandwidthMeter, TierCost, break_even_tokens, decide

LLAMA8B = 131072.0  # KV bytes per token (Llama-3-8B, bf16, all layers)
SMOL = 2_949_120 / 128  # SmolLM2-135M on CPU: one 128-token block of 30 layers


@pytest.mark.parametrize(
    ("name", "cost", "tokens", "bandwidth", "load", "reason"),
    [
        ("nothing to load", TierCost(LLAMA8B, 4000), 0, 2e9, False, "nothing"),
        ("negative tokens", TierCost(LLAMA8B, 4000), -5, 2e9, False, "nothing"),
        # A100-ish prefill (~4k tok/s at 8B) vs 2 GB/s Redis: 67 ms fetch vs 256 ms
        ("gqa on a100 loads", TierCost(LLAMA8B, 4000), 1024, 2e9, True, "faster"),
        # H100-ish prefill (~12k tok/s) vs 1 GB/s: 134 ms fetch vs 85 ms recompute
        ("h100 vs slow redis declines", TierCost(LLAMA8B, 12000), 1024, 1e9, False, "slower"),
        # SmolLM2 on this CPU (~120 tok/s prefill) vs 1 GB/s: always worth it
        ("cpu smollm2 loads", TierCost(SMOL, 120), 896, 1e9, True, "faster"),
        ("zero bandwidth declines", TierCost(SMOL, 120), 896, 0.0, False, "slower"),
        # the round trip dominates a single token: 0.5 ms rtt vs 0.25 ms prefill
        ("one token declines on rtt", TierCost(LLAMA8B, 4000), 1, 2e9, False, "slower"),
        # equal per-token costs: the margin declines
        ("tie declines with margin", TierCost(1000, 1000, rtt_s=0.0), 100, 1e6, False, "slower"),
        ("tie loads without margin", TierCost(1000, 1000, 0.0, 1.0), 100, 1e6, True, "faster"),
    ],
)
def test_decide(
    name: str, cost: TierCost, tokens: int, bandwidth: float, load: bool, reason: str
) -> None:
    verdict = decide(cost, tokens=tokens, bandwidth=bandwidth)
    assert (verdict.load, verdict.reason) == (load, reason), name
    if tokens > 0:
        assert verdict.recompute_s == pytest.approx(tokens / cost.prefill_tokens_per_s)


def test_fetch_time_formula() -> None:
    v = decide(TierCost(1000, 10, rtt_s=0.01), tokens=100, bandwidth=1e6)
    assert v.fetch_s == pytest.approx(100 * 1000 / 1e6 + 0.01)
    assert v.recompute_s == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("cost", "bandwidth", "expected"),
    [
        (TierCost(LLAMA8B, 12000), 1e9, math.inf),  # never pays off
        (TierCost(LLAMA8B, 4000), 0.0, math.inf),
        (TierCost(1000, 1000, 0.0, 1.0), 1e6, math.inf),  # equal per-token cost
        (TierCost(1000, 1000, rtt_s=0.0), 1e9, 1.0),
        (TierCost(LLAMA8B, 4000, rtt_s=0.0005), 2e9, 4.0),  # 0.6 ms / 0.17 ms per token
    ],
)
def test_break_even_tokens(cost: TierCost, bandwidth: float, expected: float) -> None:
    assert break_even_tokens(cost, bandwidth=bandwidth) == expected


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 10, 100])
def test_break_even_agrees_with_decide(tokens: int) -> None:
    cost = TierCost(LLAMA8B, 4000, rtt_s=0.0005)
    threshold = break_even_tokens(cost, bandwidth=2e9)
    assert decide(cost, tokens=tokens, bandwidth=2e9).load == (tokens >= threshold)


@pytest.mark.parametrize(
    "kw",
    [
        {"bytes_per_token": 0},
        {"prefill_tokens_per_s": 0},
        {"rtt_s": -1},
        {"margin": 0.5},
    ],
)
def test_cost_rejects_nonsense(kw: dict[str, float]) -> None:
    args = {"bytes_per_token": 1.0, "prefill_tokens_per_s": 1.0, **kw}
    with pytest.raises(ValueError, match="must|need"):
        TierCost(**args)


def test_bandwidth_meter() -> None:
    meter = BandwidthMeter(prior=1e9, alpha=0.5, min_bytes=1000)
    assert meter.value == 1e9
    meter.observe(500, 0.001)  # too small: a round trip, not bandwidth
    meter.observe(4000, 0.0)  # no time measured
    assert meter.value == 1e9 and meter.samples == 0
    meter.observe(3_000_000, 0.001)  # 3 GB/s
    assert meter.value == pytest.approx(2e9)
    meter.observe(3_000_000, 0.001)
    assert meter.value == pytest.approx(2.5e9) and meter.samples == 2


@pytest.mark.parametrize(("prior", "alpha"), [(0.0, 0.5), (1.0, 0.0), (1.0, 2.0)])
def test_meter_rejects_nonsense(prior: float, alpha: float) -> None:
    with pytest.raises(ValueError, match="need"):
        BandwidthMeter(prior, alpha=alpha)
