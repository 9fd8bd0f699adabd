"""Prefix-cache-aware scorer: a TTFT cost model, not a match-ratio threshold.

For each endpoint the expected time to first token is estimated as::

    est = (queued_prefill_tokens + (1 + recompute_weight) * uncached_prompt_tokens)
              * prefill_s_per_token
          + load * decode_s_per_request
          + kv_penalty_s * max(0, kv_usage - kv_threshold) / (1 - kv_threshold)
          + balance_s * max(0, recent_share - 1 / n) * total_load
          + placement_s * n * max(0, placed_share - 1 / n)      (placements only)

* ``uncached_prompt_tokens`` = prompt tokens minus the leading blocks the prefix index says
  the endpoint holds (``RouteRequest.prefix_blocks`` x ``block_tokens``) -- the work a cache
  hit saves -- and minus the blocks beyond those that the shared KV tier holds
  (``RouteRequest.tier_blocks``, docs/kvtier.md): every engine can load those instead, so
  they cost ``tier_s_per_token`` each (the fetch; no recompute externality) in place of
  ``(1 + recompute_weight) * prefill_s_per_token``. Once the tier holds a prefix, the
  engines differ only by what the fetch saves over it, and load and balance decide: routing
  stops trading load balance for locality. (An engine's connector fetches only when that
  beats recomputing -- the break-even gate -- so the cost is capped at the recompute cost.);
* ``queued_prefill_tokens`` (gateway counter, :mod:`routing.state`) is prefill work already
  sent there that has not produced a first token -- the queue we would wait behind;
* ``load`` (in flight, or the engine's running + waiting) slows every step by batching;
* a nearly full KV cache evicts the very prefixes we hope to reuse and preempts requests;
* ``recent_share`` is the endpoint's part of the recent traffic (decayed counts of requests
  routed, :func:`routing.types.recent_routed_at`) over ``n`` endpoints, ``total_load`` the
  requests in flight on all of them: an endpoint above its fair share pays
  ``balance_s`` per request of sticky work it holds beyond it. Scaled by the load because
  imbalance only costs when there is a queue: with nothing in flight (light or sequential
  traffic) the term is 0 and affinity is never traded for balance. In-flight counts forget
  sticky work between requests (a session thinking between turns, a prefix group between
  arrivals), so new sessions and new groups -- cold everywhere, or warm everywhere on a
  shared system prompt -- were placed on whichever engine happened to be idle at that
  instant and stayed there: 64 multi-turn sessions split 33/19/19/29 %. Warm requests keep
  their engine (their saving is far larger than the term), so it only steers the choices
  that would otherwise be a coin flip;
* a *placement* (:func:`routing.types.is_placement`: no endpoint holds more of the prompt
  than another -- a new prefix group, a new session) decides where its followers will
  queue, so it also pays ``placement_s`` per fair share of the recent placements
  (``EndpointSnapshot.recent_placed``) the endpoint holds beyond ``1 / n``, whatever the
  load. Request counts are a poor proxy here: during a cold-start burst they follow
  whichever groups happened to send followers early, and least-queued-work placement put
  16 groups 3/4/5/4 on four engines (the 5-group engine then carried 31 % of the traffic;
  warm TTFT p90 70 ms vs 57 ms with 4/4/4/4). Counting placements is what the peers' "send a
  miss to the smallest tree" does, but priced against queued work instead of absolute: one
  fair share (1.0 s by default) outweighs one queued 2,000-token prefill (~0.2 s) at four
  engines only when the shares differ by about a fifth of a share. Unique prompts are all
  placements, so they rotate like round-robin with a queue-aware veto;
* ``recompute_weight`` charges a miss for the delay its recomputation imposes on the requests
  that will queue behind it (an externality the greedy own-TTFT estimate ignores). Without it
  (0) the policy spills to cold engines too eagerly under load; with the default 1 the hit
  rate on the shared-prefix benchmark reached the oracle bound (0.71-0.72 vs 0.61).

The score is ``best_est / own_est`` (1.0 for the cheapest). So a warm endpoint wins while its
saving exceeds its extra queue; once the hot endpoint's queue costs more than recomputing the
prefix elsewhere, traffic spills over and the prefix gets replicated -- no fixed threshold.
Cold requests (no match anywhere) reduce to "least queued work", and exact ties are spread by
the picker's seq-derived tie-break, so unique prompts spread like least-request instead of
piling onto one engine (the failure of the peers' ``cache_aware`` at low concurrency).

Defaults are Llama-3-8B on A100 priors (prefill ~86 ms per 1K tokens,
autoscaling-and-gpus.md §8; the tier fetch at 128 KiB per token over ~3 GB/s of Redis
bandwidth, ~43 us per token); only the ratios matter for ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from routing.types import (
    EndpointSnapshot,
    RouteRequest,
    is_placement,
    recent_placed_at,
    recent_routed_at,
)


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """One endpoint's cost breakdown (seconds), for ``explain``."""

    endpoint: str
    cached_tokens: int
    uncached_tokens: int
    queue_s: float
    load_s: float
    kv_s: float
    balance_s: float = 0.0
    tier_tokens: int = 0

    @property
    def total_s(self) -> float:
        return self.queue_s + self.load_s + self.kv_s + self.balance_s

    def describe(self) -> str:
        return (
            f"{self.endpoint}:hit={self.cached_tokens},tier={self.tier_tokens},"
            f"miss={self.uncached_tokens},"
            f"queue={self.queue_s * 1e3:.1f}ms,load={self.load_s * 1e3:.1f}ms,"
            f"kv={self.kv_s * 1e3:.1f}ms,balance={self.balance_s * 1e3:.1f}ms"
        )


@dataclass(frozen=True, slots=True)
class PrefixCacheCost:
    """Example: ``PrefixCacheCost().score(req_with_prefix_blocks, endpoints)``."""

    reads_prefix: ClassVar[bool] = True
    """The gateway hashes prompts and looks up the prefix index only for policies that read
    ``RouteRequest.block_hashes`` / ``prefix_blocks`` (:attr:`routing.Policy.reads_prefix`)."""

    prefill_s_per_token: float = 9e-5
    tier_s_per_token: float = 4.3e-5
    decode_s_per_request: float = 2e-3
    recompute_weight: float = 1.0
    kv_threshold: float = 0.8
    kv_penalty_s: float = 1.0
    balance_s: float = 0.1
    placement_s: float = 1.0
    floor_s: float = 1e-3
    name: str = "prefix-cache"

    def __post_init__(self) -> None:
        costs = (
            self.prefill_s_per_token,
            self.decode_s_per_request,
            self.recompute_weight,
            self.tier_s_per_token,
        )
        if min(*costs, self.balance_s, self.placement_s) < 0:
            raise ValueError("costs must be >= 0")
        if not 0.0 <= self.kv_threshold < 1.0:
            raise ValueError("kv_threshold must be in [0, 1)")

    def estimate(
        self, req: RouteRequest, ep: EndpointSnapshot, imbalance_s: float = 0.0
    ) -> CostEstimate:
        """``imbalance_s``: the cost of sticky work held beyond a fair share (module doc)."""
        prompt = max(req.prompt_tokens, len(req.block_hashes) * req.block_tokens)
        cached = min(prompt, req.prefix_blocks.get(ep.id, 0) * req.block_tokens)
        tier = max(0, min(prompt, req.tier_blocks * req.block_tokens) - cached)
        uncached = prompt - cached - tier
        recompute_s = (1.0 + self.recompute_weight) * self.prefill_s_per_token
        pressure = max(0.0, ep.kv_usage - self.kv_threshold) / (1.0 - self.kv_threshold)
        return CostEstimate(
            endpoint=ep.id,
            cached_tokens=cached,
            uncached_tokens=uncached,
            tier_tokens=tier,
            queue_s=max(0, ep.prefill_tokens) * self.prefill_s_per_token
            + uncached * recompute_s
            + tier * min(self.tier_s_per_token, recompute_s),
            load_s=ep.load * self.decode_s_per_request,
            kv_s=self.kv_penalty_s * min(1.0, pressure),
            balance_s=max(0.0, imbalance_s),
        )

    def _estimates(
        self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]
    ) -> list[CostEstimate]:
        if not endpoints:
            return []
        imbalance = [0.0] * len(endpoints)
        total_load = sum(ep.load for ep in endpoints)
        if total_load > 0 and self.balance_s > 0:
            routed = [recent_routed_at(ep, req.seq) for ep in endpoints]
            _add_excess(imbalance, routed, self.balance_s * total_load)
        if self.placement_s > 0 and is_placement(req, (ep.id for ep in endpoints)):
            placed = [recent_placed_at(ep, req.seq) for ep in endpoints]
            _add_excess(imbalance, placed, self.placement_s * len(endpoints))
        return [self.estimate(req, ep, imb) for ep, imb in zip(endpoints, imbalance, strict=True)]

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]:
        est = [max(self.floor_s, e.total_s) for e in self._estimates(req, endpoints)]
        best = min(est, default=self.floor_s)
        return [best / e for e in est]

    def explain(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[str]:
        return [e.describe() for e in self._estimates(req, endpoints)]


def _add_excess(out: list[float], counts: Sequence[float], scale: float) -> None:
    """Add ``scale`` x each share of ``counts`` beyond the fair ``1 / n`` to ``out`` (nothing
    while every count is 0)."""
    total = sum(counts)
    if total <= 0:
        return
    fair = 1.0 / len(counts)
    for i, count in enumerate(counts):
        out[i] += scale * max(0.0, count / total - fair)
