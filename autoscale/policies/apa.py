"""AIBrix's APA (pkg/controller/podautoscaler, scalingStrategy APA) as a Policy, with AIBrix's
defaults (reference section 4).

Every observation records the per-pod average of the metric (kv_cache_usage_perc by default,
or num_requests_waiting) into 1 s buckets; every `eval_period_s` (10 s) the windowed average
over `window_s` (AIBrix's stable window, 180 s unless `apa.autoscaling.aibrix.ai/window` sets
it; its samples use 30 s) gives r = value / target and, with cur = max(1, ready pods):

- r > 1 + up_tolerance: desired = ceil(cur x r), at most ceil(max_scale_up_rate x cur);
- r < 1 - down_tolerance: desired = ceil(cur x r), at least floor(cur / max_scale_down_rate);
- else hold ("tolerance").

A scale-down waits `scale_down_cooldown_s` (300 s) after the last change this policy made
("cooldown"); a scale-up waits `scale_up_cooldown_s` (0 s). Between evaluations the last
decision is held. Counting ready pods only (not spec.replicas) keeps pods still starting from
multiplying a scale-up that already asked for them.

    policy = APAPolicy(APASettings(metric="kv", target=0.5))
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from autoscale.policies._common import (
    DEFAULT_TARGETS,
    Periodic,
    PolicySettings,
    ceil,
    floor,
    hold,
    per_pod_average,
)
from autoscale.signals import Decision, Observation
from autoscale.window import SecondWindow

__all__ = ["APAPolicy", "APASettings"]

REASONS = (
    "stale",
    "hold",
    "no_data",
    "tolerance",
    "pending",
    "scale_up",
    "scale_down",
    "cooldown",
)


class APASettings(PolicySettings):
    """`APASettings(metric="waiting", target=5)`; the defaults are AIBrix's."""

    metric: Literal["waiting", "kv"] = "kv"
    target: float | None = Field(default=None, gt=0)  # None: DEFAULT_TARGETS[metric]
    up_tolerance: float = Field(default=0.1, ge=0)
    down_tolerance: float = Field(default=0.1, ge=0, lt=1)
    max_scale_up_rate: float = Field(default=2.0, gt=1)
    max_scale_down_rate: float = Field(default=2.0, gt=1)
    eval_period_s: float = Field(default=10.0, gt=0)
    window_s: float = Field(default=180.0, ge=1)
    scale_up_cooldown_s: float = Field(default=0.0, ge=0)
    scale_down_cooldown_s: float = Field(default=300.0, ge=0)

    @property
    def effective_target(self) -> float:
        return self.target if self.target is not None else DEFAULT_TARGETS[self.metric]


class APAPolicy:
    """AIBrix APA on one per-pod metric: `APAPolicy(APASettings()).decide(obs)`."""

    name = "apa"

    def __init__(self, settings: APASettings | None = None) -> None:
        self.settings = settings or APASettings()
        self._eval = Periodic(self.settings.eval_period_s)
        self._values = SecondWindow(self.settings.window_s)
        self._last: Decision | None = None
        self._last_scale: float | None = None

    def decide(self, obs: Observation) -> Decision:
        if obs.stale:
            return hold(obs, "stale")
        value = per_pod_average(obs, self.settings.metric)
        if value is not None:
            self._values.record(obs.now, value)
        if not self._eval.due(obs.now):
            desired = self._last.desired if self._last is not None else obs.current
            return Decision(desired=desired, reason="hold")
        self._last = self._evaluate(obs)
        if self._last.desired != obs.current:
            self._last_scale = obs.now
        return self._last

    def _evaluate(self, obs: Observation) -> Decision:
        s = self.settings
        value = self._values.average(s.window_s, now=obs.now)
        if value is None:
            return hold(obs, "no_data")
        ratio = value / s.effective_target
        cur = max(1, obs.ready)
        if ratio > 1 + s.up_tolerance:
            desired = min(ceil(cur * ratio), ceil(s.max_scale_up_rate * cur))
            cooldown = s.scale_up_cooldown_s
        elif ratio < 1 - s.down_tolerance:
            desired = max(ceil(cur * ratio), floor(cur / s.max_scale_down_rate))
            cooldown = s.scale_down_cooldown_s
        else:
            return hold(obs, "tolerance")
        if (desired - obs.current) * (ratio - 1) <= 0:
            # no change, or pods still starting make ready x r land on the other side of
            # spec.replicas: never turn a scale-up signal into a scale-down (or back)
            return hold(obs, "pending" if obs.pending and ratio > 1 else "hold")
        if self._last_scale is not None and obs.now - self._last_scale < cooldown:
            return hold(obs, "cooldown")
        reason = "scale_up" if desired > obs.current else "scale_down"
        return Decision(desired=desired, reason=reason)
