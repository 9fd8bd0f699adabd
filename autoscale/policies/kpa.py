"""Knative's KPA (knative/serving pkg/autoscaler/scaling/autoscaler.go `Scale`) as a Policy, with
the `config-autoscaler` defaults (reference section 2).

Every observation records the total in-flight concurrency (the gateway's exact in-flight
count per engine, or running + waiting where that is 0) into 1 s buckets. Every `tick_s` (2 s):

- ready = max(1, ready pods); stable and panic values are the averages over the last
  `stable_window_s` (60 s) and `stable_window_s x panic_window_percentage / 100` (6 s);
- desired_x = ceil(value_x / target) clamped to [floor(ready / max_scale_down_rate),
  ceil(max_scale_up_rate x ready)] for each window;
- panic starts when desired_panic / ready >= panic_threshold (2.0), is extended while that
  holds, and ends once a full stable window has passed without it; in panic the desired count
  is max(stable, panic) and never decreases;
- an optional scale-down delay keeps the highest desired count of its window (default 0 s).

Between ticks the last decision is held.
`target` is the per-pod in-flight target: Knative's 100 x 0.7 = 70 by default, which suits a
web server, not an LLM engine (a vLLM engine runs up to max_num_seqs = 256 at once but meets a
TTFT SLO only far below that), so the benchmark sets it to the engine's in-flight count at
the SLO.

    policy = KPAPolicy(KPASettings(target=24))
"""

from __future__ import annotations

from pydantic import Field

from autoscale.policies._common import Periodic, PolicySettings, ceil, floor, hold
from autoscale.signals import Decision, Observation
from autoscale.window import SecondWindow

__all__ = ["KPAPolicy", "KPASettings"]

REASONS = ("stale", "hold", "panic", "scale_up", "scale_down")


class KPASettings(PolicySettings):
    """`KPASettings(target=24)`; the defaults are Knative's `config-autoscaler`."""

    target: float = Field(default=70.0, gt=0)  # container-concurrency-target 100 x 0.7
    stable_window_s: float = Field(default=60.0, ge=6.0, le=3600.0)
    panic_window_percentage: float = Field(default=10.0, gt=0, le=100)
    panic_threshold: float = Field(default=2.0, gt=0)  # panic-threshold-percentage 200
    max_scale_up_rate: float = Field(default=1000.0, gt=1)
    max_scale_down_rate: float = Field(default=2.0, gt=1)
    tick_s: float = Field(default=2.0, gt=0)
    scale_down_delay_s: float = Field(default=0.0, ge=0)

    @property
    def panic_window_s(self) -> float:
        return self.stable_window_s * self.panic_window_percentage / 100


class KPAPolicy:
    """Knative KPA on total concurrency: `KPAPolicy(KPASettings(target=24)).decide(obs)`."""

    name = "kpa"

    def __init__(self, settings: KPASettings | None = None) -> None:
        self.settings = settings or KPASettings()
        self._tick = Periodic(self.settings.tick_s)
        self._concurrency = SecondWindow(self.settings.stable_window_s)
        self._delay = SecondWindow(max(1.0, self.settings.scale_down_delay_s))
        self._panic_since: float | None = None  # Knative's panicTime: last time over threshold
        self._max_panic_pods = 0
        self._last: Decision | None = None

    @property
    def panicking(self) -> bool:
        return self._panic_since is not None

    def decide(self, obs: Observation) -> Decision:
        if obs.stale:
            return hold(obs, "stale")
        self._concurrency.record(obs.now, obs.concurrency)
        if not self._tick.due(obs.now) and self._last is not None:
            return Decision(desired=self._last.desired, reason="hold", panic=self._last.panic)
        self._last = self._scale(obs)
        return self._last

    def _scale(self, obs: Observation) -> Decision:
        s = self.settings
        now = obs.now
        # both windows hold at least this tick's sample, recorded just before
        stable = self._concurrency.average(s.stable_window_s, now=now) or 0.0
        panic = self._concurrency.average(s.panic_window_s, now=now) or 0.0
        ready = max(1, obs.ready)
        up_limit = ceil(s.max_scale_up_rate * ready)
        down_limit = floor(ready / s.max_scale_down_rate)
        desired_stable = min(max(ceil(stable / s.target), down_limit), up_limit)
        desired_panic = min(max(ceil(panic / s.target), down_limit), up_limit)

        over = desired_panic / ready >= s.panic_threshold
        if over:
            self._panic_since = now
        elif self._panic_since is not None and self._panic_since + s.stable_window_s < now:
            self._panic_since = None
            self._max_panic_pods = 0

        desired = desired_stable
        if self._panic_since is not None:
            desired = max(desired, desired_panic, self._max_panic_pods)
            self._max_panic_pods = desired
        if s.scale_down_delay_s > 0:
            self._delay.record(now, desired)
            desired = int(self._delay.maximum(s.scale_down_delay_s, now=now) or desired)

        in_panic = self._panic_since is not None
        if in_panic:
            reason = "panic"
        elif desired > obs.current:
            reason = "scale_up"
        elif desired < obs.current:
            reason = "scale_down"
        else:
            reason = "hold"
        return Decision(desired=desired, reason=reason, panic=in_panic)
