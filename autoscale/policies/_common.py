"""What the policies share: the settings base, the per-pod metrics the baselines scale on, the
periodic-evaluation gate, and a tolerant ceil."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict

from autoscale.signals import Decision, EngineSignals, Observation

MetricName = Literal["waiting", "kv"]

# The per-pod target when a setting leaves it unset. waiting = 5: the top of the 3-5 range GKE's
# LLM autoscaling best practice starts the queue-size threshold at (then tuned), and the queue
# llm-d's WVA calls saturated (reference section 5: "queue >= 5"); a few queued requests per
# replica keep the batch full without a long wait. kv = 0.5: AIBrix's samples target
# kv_cache_usage_perc 0.5.
DEFAULT_TARGETS: dict[str, float] = {"waiting": 5.0, "kv": 0.5}

# Floating-point slack: 0.1 * 30 is 3.0000000000000004, whose ceil would be one pod too many.
_EPS = 1e-9


class PolicySettings(BaseModel):
    """Base of every policy's settings: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def ceil(x: float) -> int:
    """math.ceil that forgives float noise just above an integer."""
    return math.ceil(x - _EPS)


def floor(x: float) -> int:
    """math.floor that forgives float noise just below an integer."""
    return math.floor(x + _EPS)


def engine_metric(engine: EngineSignals, metric: MetricName) -> float | None:
    """The per-pod metric a baseline scales on; None when the pod has none (not ready, or no
    KV gauge scraped)."""
    if not engine.ready:
        return None
    if metric == "waiting":
        return engine.waiting
    return engine.kv_usage


def per_pod_average(obs: Observation, metric: MetricName) -> float | None:
    """Average of the metric over the pods that report it; None when none do."""
    values = [v for e in obs.engines if (v := engine_metric(e, metric)) is not None]
    if not values:
        return None
    return sum(values) / len(values)


def hold(obs: Observation, reason: str) -> Decision:
    """Keep the current replicas."""
    return Decision(desired=obs.current, reason=reason)


class Periodic:
    """Says when a policy that evaluates every `period_s` (HPA's sync, KPA's tick, APA's
    evaluation) is due: at the first observation, then once `period_s` has passed."""

    def __init__(self, period_s: float) -> None:
        self._period = period_s
        self._last: float | None = None

    def due(self, now: float) -> bool:
        if self._last is not None and now - self._last < self._period - _EPS:
            return False
        self._last = now
        return True
