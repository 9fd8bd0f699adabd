"""The break-even gate: load a prefix from the KV tier only when that beats recomputing it.

Pure. For ``n`` tokens the tier holds beyond the engine's local hit::

    fetch_s     = n * bytes_per_token / bandwidth + rtt_s
    recompute_s = n / prefill_tokens_per_s

and the gate loads only when ``fetch_s * margin <= recompute_s`` (``margin`` > 1 asks the
tier to be clearly faster: a prediction error then costs little). Both sides are linear in
``n``, so the answer is all or nothing: either per-token fetching is cheaper than per-token
prefill and loads pay off above :func:`break_even_tokens` (the round trip amortised), or the
tier never pays off on this engine (fast GPU, slow tier: an H100 against one Redis over TCP,
see docs/kvtier.md). Prefill cost grows with context (attention), so ``recompute_s`` is an
underestimate for long prompts: the gate errs towards recomputing.

The bandwidth is measured, not configured: :class:`BandwidthMeter` is an EWMA of observed
transfers (bytes and seconds of each ``get_many``) seeded with a prior. The caller counts
declines (``BlockStore.record_decline``) so operators see when the tier is skipped.

Example::

    cost = TierCost(bytes_per_token=131072, prefill_tokens_per_s=4000, rtt_s=0.0002)
    decide(cost, tokens=1024, bandwidth=2e9).load   # True: 67 ms fetch vs 256 ms prefill
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BandwidthMeter", "TierCost", "Verdict", "break_even_tokens", "decide"]


@dataclass(frozen=True, slots=True)
class TierCost:
    """An engine's side of the comparison.

    Example: ``TierCost(bytes_per_token=23040, prefill_tokens_per_s=120)`` (SmolLM2 on CPU:
    2,949,120 bytes per 128-token block).
    """

    bytes_per_token: float
    prefill_tokens_per_s: float
    rtt_s: float = 0.0005
    margin: float = 1.2

    def __post_init__(self) -> None:
        if self.bytes_per_token <= 0 or self.prefill_tokens_per_s <= 0:
            raise ValueError("bytes_per_token and prefill_tokens_per_s must be positive")
        if self.rtt_s < 0 or self.margin < 1:
            raise ValueError("need rtt_s >= 0 and margin >= 1")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The gate's answer; ``reason`` is a bounded label: ``faster``, ``slower``, ``nothing``."""

    load: bool
    fetch_s: float
    recompute_s: float
    reason: str


def decide(cost: TierCost, *, tokens: int, bandwidth: float) -> Verdict:
    """Load ``tokens`` tokens from a tier of ``bandwidth`` bytes/s, or recompute them?"""
    if tokens <= 0:
        return Verdict(False, 0.0, 0.0, "nothing")
    fetch = tokens * cost.bytes_per_token / bandwidth + cost.rtt_s if bandwidth > 0 else math.inf
    recompute = tokens / cost.prefill_tokens_per_s
    load = fetch * cost.margin <= recompute
    return Verdict(load, fetch, recompute, "faster" if load else "slower")


def break_even_tokens(cost: TierCost, *, bandwidth: float) -> float:
    """The smallest token count the gate loads (``inf``: the tier never pays off here)."""
    per_token_gain = 1 / cost.prefill_tokens_per_s - (
        cost.margin * cost.bytes_per_token / bandwidth if bandwidth > 0 else math.inf
    )
    if per_token_gain <= 0:
        return math.inf
    return max(1.0, math.ceil(cost.margin * cost.rtt_s / per_token_gain))


class BandwidthMeter:
    """EWMA of observed tier bandwidth (bytes/s), seeded with a prior.

    Transfers smaller than ``min_bytes`` are ignored: their time is mostly the round trip,
    which :attr:`TierCost.rtt_s` already charges. Not thread-safe (one owner).

    Example: ``meter = BandwidthMeter(prior=1e9); meter.observe(2**21, 0.0015); meter.value``.
    """

    def __init__(self, prior: float, *, alpha: float = 0.2, min_bytes: int = 65536) -> None:
        if prior <= 0 or not 0 < alpha <= 1:
            raise ValueError("need prior > 0 and 0 < alpha <= 1")
        self._value = prior
        self._alpha = alpha
        self._min_bytes = min_bytes
        self.samples = 0

    @property
    def value(self) -> float:
        return self._value

    def observe(self, nbytes: int, seconds: float) -> None:
        """Fold in one transfer of ``nbytes`` that took ``seconds`` (wall, end to end)."""
        if nbytes < self._min_bytes or seconds <= 0:
            return
        self._value += self._alpha * (nbytes / seconds - self._value)
        self.samples += 1
