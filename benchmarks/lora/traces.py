"""The LoRA benchmark's workload: many adapters, Zipf popularity, a popularity shift half-way.

Pure and deterministic (a seed fixes everything). ``n_adapters`` adapters named
``adapter-00`` ... share one base model; before ``shift_at_s`` adapter ``i`` has popularity rank
``i`` (weight ``1 / (rank + 1) ** zipf_s``), after it the ranking rotates by ``rotate`` places so
that adapters that were cold become the hot ones (rank of ``i`` = ``(i - rotate) mod n``).
Arrivals are open-loop Poisson at ``rate`` requests/s over ``duration_s`` simulated seconds;
each request picks its adapter from the phase's weights and gets a prompt and output length
drawn uniformly from the configured ranges. Usage::

    cfg = TraceConfig(rate=20.0, duration_s=120.0)
    trace = make_trace(cfg)
    hot_after = hot_adapters(cfg, phase=1, k=2)   # the adapters the shift makes hottest
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = [
    "TraceConfig",
    "TraceRequest",
    "adapter_name",
    "adapter_rates",
    "hot_adapters",
    "make_trace",
    "rank_of",
    "zipf_weights",
]


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """Shape of one run's load. Times in simulated seconds."""

    rate: float = 20.0  # requests/s, all adapters together
    duration_s: float = 120.0
    n_adapters: int = 50
    zipf_s: float = 1.0
    shift_at_s: float | None = None  # None: half-way through
    rotate: int | None = None  # None: n_adapters // 2
    prompt_tokens: tuple[int, int] = (192, 320)
    output_tokens: tuple[int, int] = (24, 40)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0 or self.n_adapters < 1 or self.zipf_s < 0:
            raise ValueError("rate, duration_s and n_adapters must be positive, zipf_s >= 0")
        for low, high in (self.prompt_tokens, self.output_tokens):
            if not 1 <= low <= high:
                raise ValueError("token ranges need 1 <= low <= high")

    @property
    def shift_s(self) -> float:
        return self.duration_s / 2 if self.shift_at_s is None else self.shift_at_s

    @property
    def rotation(self) -> int:
        return self.n_adapters // 2 if self.rotate is None else self.rotate % self.n_adapters


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of the trace: when (simulated s from the start), which adapter, how big."""

    at_s: float
    adapter: str
    prompt_tokens: int
    max_tokens: int
    phase: int  # 0 before the shift, 1 after


def adapter_name(i: int) -> str:
    return f"adapter-{i:02d}"


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf weights for ranks 0..n-1: ``(rank + 1) ** -s / H``."""
    raw = [1.0 / (rank + 1) ** s for rank in range(n)]
    total = math.fsum(raw)
    return [w / total for w in raw]


def rank_of(cfg: TraceConfig, adapter: int, phase: int) -> int:
    """Popularity rank (0 = hottest) of adapter index ``adapter`` in ``phase``."""
    shift = cfg.rotation if phase else 0
    return (adapter - shift) % cfg.n_adapters


def adapter_rates(cfg: TraceConfig, phase: int) -> dict[str, float]:
    """Expected requests/s of every adapter in ``phase``."""
    weights = zipf_weights(cfg.n_adapters, cfg.zipf_s)
    return {
        adapter_name(i): cfg.rate * weights[rank_of(cfg, i, phase)] for i in range(cfg.n_adapters)
    }


def hot_adapters(cfg: TraceConfig, *, phase: int, k: int) -> tuple[str, ...]:
    """The ``k`` most popular adapters of ``phase``, hottest first."""
    by_rank = sorted(range(cfg.n_adapters), key=lambda i: rank_of(cfg, i, phase))
    return tuple(adapter_name(i) for i in by_rank[:k])


def make_trace(cfg: TraceConfig) -> list[TraceRequest]:
    """Poisson arrivals over ``duration_s``; adapter drawn from the current phase's Zipf."""
    rng = random.Random(cfg.seed)
    names = [adapter_name(i) for i in range(cfg.n_adapters)]
    weights = zipf_weights(cfg.n_adapters, cfg.zipf_s)
    by_phase = [
        [weights[rank_of(cfg, i, phase)] for i in range(cfg.n_adapters)] for phase in (0, 1)
    ]
    out: list[TraceRequest] = []
    t = 0.0
    limit = int(cfg.rate * cfg.duration_s * 4) + 100  # bounded even for a wild draw
    for _ in range(limit):
        t += rng.expovariate(cfg.rate)
        if t >= cfg.duration_s:
            break
        phase = 1 if t >= cfg.shift_s else 0
        adapter = rng.choices(names, weights=by_phase[phase])[0]
        out.append(
            TraceRequest(
                at_s=t,
                adapter=adapter,
                prompt_tokens=rng.randint(*cfg.prompt_tokens),
                max_tokens=rng.randint(*cfg.output_tokens),
                phase=phase,
            )
        )
    return out
