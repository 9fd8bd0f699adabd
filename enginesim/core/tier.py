"""The shared KV tier as the core sees it: what loading a prefix costs, and whether it pays.

Pure: the server looks prompts up in Redis (``enginesim/server/kvtier.py``) and hands the core
the number of leading prompt blocks the tier held (``SimRequest.tier_blocks``). At admission
the scheduler takes the blocks beyond its local prefix hit, up to vLLM's limit of
``(num_tokens - 1) // block_size`` blocks (one token is always computed), and asks
:meth:`TierCost.worth_loading` whether fetching them beats recomputing them (the break-even
rule of simulator-guide.md §4)::

    fetch_s     = tokens * kv_bytes_per_token / read_bytes_per_s + rtt_s
    recompute_s = c_prefill_s * tokens + c_attn_s * tokens * (start + tokens / 2)

(``start`` = the local hit the loaded tokens follow; the recompute term is the step-time
model's own prefill cost, :mod:`enginesim.core.timing`). A load that does not pay is declined
and counted; the tokens are then computed. The load is synchronous, like a connector that
loads inside the forward pass: its ``fetch_s`` is added to the step that admits the request.
"""

from __future__ import annotations

from dataclasses import dataclass

from enginesim.core.profile import EngineProfile

__all__ = ["TierCost"]


@dataclass(frozen=True, slots=True)
class TierCost:
    """Fetch-time model of the tier for one engine profile.

    Example: ``TierCost.from_profile(p).fetch_s(2048)`` -> seconds to load 2,048 tokens.
    """

    bytes_per_token: float
    read_bytes_per_s: float
    rtt_s: float
    c_prefill_s: float
    c_attn_s: float

    def __post_init__(self) -> None:
        if self.bytes_per_token <= 0 or self.read_bytes_per_s <= 0 or self.rtt_s < 0:
            raise ValueError("tier cost needs bytes_per_token > 0, bandwidth > 0, rtt >= 0")

    @classmethod
    def from_profile(cls, p: EngineProfile) -> TierCost:
        """The profile's KV bytes per token, tier bandwidth and round trip."""
        if p.kv_bytes_per_token <= 0:
            raise ValueError(f"profile {p.name!r}: a KV tier needs kv_bytes_per_token > 0")
        return cls(
            bytes_per_token=p.kv_bytes_per_token,
            read_bytes_per_s=p.kv_tier_read_bytes_per_s,
            rtt_s=p.kv_tier_rtt_s,
            c_prefill_s=p.c_prefill_s,
            c_attn_s=p.c_attn_s,
        )

    def fetch_s(self, tokens: int) -> float:
        """Seconds to load ``tokens`` tokens of KV from the tier (one pipelined round trip)."""
        return tokens * self.bytes_per_token / self.read_bytes_per_s + self.rtt_s

    def recompute_s(self, tokens: int, start: int) -> float:
        """Seconds the step-time model charges to prefill ``tokens`` tokens after ``start``."""
        return self.c_prefill_s * tokens + self.c_attn_s * tokens * (start + tokens / 2)

    def worth_loading(self, tokens: int, start: int) -> bool:
        """The break-even gate: load only when fetching is faster than recomputing."""
        return tokens > 0 and self.fetch_s(tokens) < self.recompute_s(tokens, start)
