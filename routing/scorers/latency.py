"""Least-latency: prefer the engine with the lowest expected request latency.

Expected latency = TTFT EWMA + ITL EWMA x expected output tokens (``max_tokens``, else
``default_output_tokens``), from the gateway's own per-engine EWMAs (:mod:`routing.state`).
An engine without observations yet gets the mean of the known ones, so new engines are
neither starved nor flooded. Score = best / own (1.0 for the fastest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.types import EndpointSnapshot, RouteRequest


def _fill(values: list[float | None]) -> list[float]:
    known = [v for v in values if v is not None]
    mean = sum(known) / len(known) if known else 0.0
    return [mean if v is None else v for v in values]


@dataclass(frozen=True, slots=True)
class LeastLatency:
    """Example: ttft [0.1, 0.3], itl [0.01, 0.01], 10 tokens -> est [0.2, 0.4] -> [1.0, 0.5]."""

    default_output_tokens: int = 256
    floor_s: float = 1e-3
    name: str = "least-latency"

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]:
        out = req.max_tokens if req.max_tokens is not None else self.default_output_tokens
        ttft = _fill([ep.ttft_ewma_s for ep in endpoints])
        itl = _fill([ep.itl_ewma_s for ep in endpoints])
        est = [max(self.floor_s, t + i * out) for t, i in zip(ttft, itl, strict=True)]
        best = min(est, default=self.floor_s)
        return [best / e for e in est]
