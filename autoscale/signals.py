"""What an autoscaling policy sees and what it answers: the seam between the pure policies
(autoscale/policies/) and the I/O around them (the actuator's 1 s loop, the benchmark).

An `Observation` is one tick's snapshot: the scale target's replicas, how many are ready, one
`EngineSignals` per engine (the engines' `vllm:` gauges plus the gateway's exact counts) and the
gateway's arrival rates over the last second. A `Policy` turns a sequence of observations into
`Decision`s; it keeps its own windows and reads time only from `Observation.now`, so a policy is
deterministic given the observations and tests drive it with a fake clock:

    policy = build("hpa", {"metric": "waiting"})
    decision = policy.decide(Observation(now=0.0, current=2, ready=2, engines=(...)))

Min/max clamping, rate limits on patches and leader election belong to the actuator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Decision", "EngineSignals", "Observation", "Policy"]


@dataclass(frozen=True, slots=True)
class EngineSignals:
    """One engine (pod) at one tick: `EngineSignals(id="pod-a", ready=True, waiting=3.0)`."""

    id: str
    ready: bool
    running: float = 0.0  # vllm:num_requests_running
    waiting: float = 0.0  # vllm:num_requests_waiting
    kv_usage: float | None = None  # vllm:kv_cache_usage_perc (0..1)
    in_flight: int = 0  # gateway's exact count
    in_flight_tokens: int = 0  # gateway: prompt + expected output tokens in flight
    queued_prompt_tokens: int = 0  # gateway: prompt tokens sent, first token not yet seen
    ttft_s: float | None = None  # recent TTFT (EWMA or window)
    itl_s: float | None = None

    @property
    def concurrency(self) -> float:
        """Requests in flight on this engine: the gateway's exact count, else running + waiting
        (engines the gateway does not front, or a gateway that has not counted yet)."""
        if self.in_flight > 0:
            return float(self.in_flight)
        return self.running + self.waiting


@dataclass(frozen=True, slots=True)
class Observation:
    """One tick's snapshot of a scale target: `Observation(now=12.0, current=3, ready=2)`."""

    now: float  # seconds on the injected clock (simulated time in the bench)
    current: int  # spec.replicas of the scale target
    ready: int  # ready pods/engines
    engines: tuple[EngineSignals, ...] = ()
    arrival_rate: float = 0.0  # requests/s arrived in the last second (gateway)
    prompt_token_rate: float = 0.0  # prompt tokens/s arrived in the last second
    output_token_rate: float = 0.0  # expected output tokens/s arrived (max_tokens or estimate)
    stale: bool = False  # metrics too old or missing: policies must hold

    @property
    def pending(self) -> int:
        """Replicas asked for but not ready yet (starting pods)."""
        return max(0, self.current - self.ready)

    @property
    def concurrency(self) -> float:
        """Total requests in flight over all engines (see `EngineSignals.concurrency`)."""
        return sum(e.concurrency for e in self.engines)

    @property
    def token_rate(self) -> float:
        """Prompt plus expected output tokens/s arrived in the last second."""
        return self.prompt_token_rate + self.output_token_rate


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer: `Decision(desired=4, reason="scale_up")`."""

    desired: int
    reason: str  # short bounded vocabulary, used as a metric label
    panic: bool = False


class Policy(Protocol):
    """A scaling policy: stateful (its windows), deterministic given the observations, no I/O."""

    name: str

    def decide(self, obs: Observation) -> Decision: ...
