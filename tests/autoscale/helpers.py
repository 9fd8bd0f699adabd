"""Building observations for the policy table tests: a fake clock is just the `now` of each
Observation in a sequence."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from autoscale.signals import Decision, EngineSignals, Observation, Policy


def pods(
    n: int,
    *,
    waiting: float = 0.0,
    kv: float | None = None,
    in_flight: int = 0,
    ttft: float | None = None,
    itl: float | None = None,
    queued_prompt_tokens: int = 0,
    in_flight_tokens: int = 0,
    ready: bool = True,
    prefix: str = "pod",
) -> tuple[EngineSignals, ...]:
    """n identical engines."""
    return tuple(
        EngineSignals(
            id=f"{prefix}-{i}",
            ready=ready,
            waiting=waiting,
            kv_usage=kv,
            in_flight=in_flight,
            ttft_s=ttft,
            itl_s=itl,
            queued_prompt_tokens=queued_prompt_tokens,
            in_flight_tokens=in_flight_tokens,
        )
        for i in range(n)
    )


def waiting_pods(values: Sequence[float], *, ready: bool = True) -> tuple[EngineSignals, ...]:
    """One engine per value of num_requests_waiting."""
    return tuple(EngineSignals(id=f"pod-{i}", ready=ready, waiting=v) for i, v in enumerate(values))


def kv_pods(values: Sequence[float | None], *, prefix: str = "pod") -> tuple[EngineSignals, ...]:
    """One ready engine per KV usage value (None: the gauge is missing)."""
    return tuple(
        EngineSignals(id=f"{prefix}-{i}", ready=True, kv_usage=v) for i, v in enumerate(values)
    )


def obs(
    now: float,
    current: int,
    engines: tuple[EngineSignals, ...] = (),
    *,
    ready: int | None = None,
    prompt: float = 0.0,
    output: float = 0.0,
    rate: float = 0.0,
    stale: bool = False,
) -> Observation:
    """An observation; ready defaults to the ready engines (or current without engines)."""
    if ready is None:
        ready = sum(e.ready for e in engines) if engines else current
    return Observation(
        now=now,
        current=current,
        ready=ready,
        engines=engines,
        arrival_rate=rate,
        prompt_token_rate=prompt,
        output_token_rate=output,
        stale=stale,
    )


def run(policy: Policy, observations: Iterable[Observation]) -> list[Decision]:
    """Feed observations in order; the decisions."""
    return [policy.decide(o) for o in observations]
