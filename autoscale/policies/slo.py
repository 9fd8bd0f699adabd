"""Ours, SLO-driven: scale on how close the engines' latencies are to the SLO, on top of the
token-demand model when capacities are given.

Each tick the *pressure* is max(TTFT_p90 / ttft_slo_s, ITL_p90 / itl_slo_s), the p90 taken
over the ready engines' recent TTFT and ITL (nearest rank; the signals carry each engine's
recent value, not a histogram, so this is the engine at the 90th percentile). Pressure 1 is
the SLO; headroom is 1 - pressure. An idle fleet (nothing in flight, no latency reported)
has pressure 0; latencies missing under load are not recorded (no evidence either way).

- Up: when the `up_window_s` (5 s) average pressure exceeds `up_pressure` (0.8, i.e. under
  20 % headroom), desired = ceil(replicas x pressure / `target_pressure`) (0.6): proportional
  to the violation, at least one pod more, at most `max_up_factor` (2) x replicas. Latency
  lags capacity by a cold start, so after a scale-up the policy waits for the pods to turn
  ready and then `settle_s` (15 s) for queues to drain before it reads latency again
  ("pending", "settling"): the cascade the up rule would otherwise make.
- Down: when the highest pressure over `down_stabilisation_s` (180 s) stays under
  `down_pressure` (0.3), one pod less per `down_interval_s` (30 s), not within a
  stabilisation window of the start; never while pods are pending.
- Token demand (with `prompt_tokens_per_s` and `output_tokens_per_s` set, as for the
  proactive policy; `lead_time_s` its lead time): the proactive policy runs inside and
  leads. Its scale-ups are taken at once ("demand"), latency above the band adds to them
  (the capacities are estimates; latency is what the SLO measures), and its scale-downs are
  taken only when latency has stayed under the down band for the stabilisation window (else
  "hold"). The latency-only scale-down does not run then: the token model sizes the floor.

    policy = SLOPolicy(SLOSettings(ttft_slo_s=1.0, itl_slo_s=0.1))
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from autoscale.policies._common import PolicySettings, ceil, hold
from autoscale.policies.proactive import ProactivePolicy, ProactiveSettings
from autoscale.signals import Decision, Observation
from autoscale.window import SecondWindow

__all__ = ["SLOPolicy", "SLOSettings"]

REASONS = (
    "stale",
    "hold",
    "scale_up",
    "scale_down",
    "demand",
    "pending",
    "settling",
    "stabilising",
    "burst",
)


class SLOSettings(PolicySettings):
    """`SLOSettings(ttft_slo_s=2.0, itl_slo_s=0.1)`; see the module."""

    ttft_slo_s: float = Field(default=1.0, gt=0)
    itl_slo_s: float = Field(default=0.1, gt=0)
    target_pressure: float = Field(default=0.6, gt=0)
    up_pressure: float = Field(default=0.8, gt=0)
    down_pressure: float = Field(default=0.3, ge=0)
    up_window_s: float = Field(default=5.0, ge=1)
    max_up_factor: float = Field(default=2.0, gt=1)
    settle_s: float = Field(default=15.0, ge=0)
    down_stabilisation_s: float = Field(default=180.0, ge=1)
    down_interval_s: float = Field(default=30.0, ge=0)
    prompt_tokens_per_s: float | None = Field(default=None, gt=0)
    output_tokens_per_s: float | None = Field(default=None, gt=0)
    lead_time_s: float = Field(default=150.0, ge=0)

    @model_validator(mode="after")
    def _bands(self) -> SLOSettings:
        if not self.down_pressure < self.target_pressure < self.up_pressure:
            raise ValueError("need down_pressure < target_pressure < up_pressure")
        if (self.prompt_tokens_per_s is None) != (self.output_tokens_per_s is None):
            raise ValueError("set both prompt_tokens_per_s and output_tokens_per_s, or neither")
        return self

    def demand_settings(self) -> ProactiveSettings | None:
        """The inner token-demand policy's settings; None without capacities."""
        if self.prompt_tokens_per_s is None or self.output_tokens_per_s is None:
            return None
        return ProactiveSettings(
            prompt_tokens_per_s=self.prompt_tokens_per_s,
            output_tokens_per_s=self.output_tokens_per_s,
            lead_time_s=self.lead_time_s,
            down_stabilisation_s=self.down_stabilisation_s,
        )


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


class SLOPolicy:
    """Latency-headroom autoscaling: `SLOPolicy(SLOSettings()).decide(obs)`."""

    name = "slo"

    def __init__(self, settings: SLOSettings | None = None) -> None:
        s = self.settings = settings or SLOSettings()
        self._pressure = SecondWindow(max(s.up_window_s, s.down_stabilisation_s))
        demand = s.demand_settings()
        self._demand = None if demand is None else ProactivePolicy(demand)
        self._waiting_for_pods = False
        self._ready_since: float | None = None  # when the last pending pod turned ready
        self._last_down: float | None = None
        self._started: float | None = None

    def pressure(self, obs: Observation) -> float | None:
        """Observed latency over the SLO (see the module docstring); None when unknown."""
        s = self.settings
        ready = [e for e in obs.engines if e.ready]
        ttfts = [e.ttft_s for e in ready if e.ttft_s is not None]
        itls = [e.itl_s for e in ready if e.itl_s is not None]
        ratios = []
        if ttfts:
            ratios.append(p90(ttfts) / s.ttft_slo_s)
        if itls:
            ratios.append(p90(itls) / s.itl_slo_s)
        if ratios:
            return max(ratios)
        return 0.0 if obs.concurrency == 0 else None

    def decide(self, obs: Observation) -> Decision:
        if obs.stale:
            return hold(obs, "stale")
        s = self.settings
        now = obs.now
        started = self._started = now if self._started is None else self._started
        pressure = self.pressure(obs)
        if pressure is not None:
            self._pressure.record(now, pressure)
        base = None if self._demand is None else self._demand.decide(obs)
        if obs.pending:
            self._waiting_for_pods = True
        elif self._waiting_for_pods:
            self._waiting_for_pods = False
            self._ready_since = now

        demand_up = base is not None and base.desired > obs.current
        recent = self._pressure.average(s.up_window_s, now=now)
        if recent is not None and recent > s.up_pressure:
            waiting = obs.pending or (
                self._ready_since is not None and now - self._ready_since < s.settle_s
            )
            if not waiting:
                factor = min(recent / s.target_pressure, s.max_up_factor)
                desired = max(obs.current + 1, ceil(obs.current * factor))
                if base is not None:
                    desired = max(desired, base.desired)
                return Decision(desired=desired, reason="scale_up")
            if not demand_up:
                return hold(obs, "pending" if obs.pending else "settling")
        if base is None:
            return self._down(obs, started)
        if demand_up:
            return Decision(desired=base.desired, reason="demand")
        highest = self._pressure.maximum(s.down_stabilisation_s, now=now)
        if base.desired < obs.current and highest is not None and highest >= s.down_pressure:
            return hold(obs, "hold")  # latency was not calm: keep what serves it
        return base

    def _down(self, obs: Observation, started: float) -> Decision:
        s = self.settings
        now = obs.now
        highest = self._pressure.maximum(s.down_stabilisation_s, now=now)
        if highest is None or highest >= s.down_pressure or obs.current < 1:
            return hold(obs, "hold")
        if obs.pending:
            return hold(obs, "pending")
        if now - started < s.down_stabilisation_s or (
            self._last_down is not None and now - self._last_down < s.down_interval_s
        ):
            return hold(obs, "stabilising")
        self._last_down = now
        return Decision(desired=obs.current - 1, reason="scale_down")
