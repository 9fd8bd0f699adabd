"""From a policy's desired replica count to the one scale patch, within the configured limits.

The pure part, :func:`clamp` and :func:`record`, is table-tested with plain float times. In
the order applied:

1. **bounds**: the result is always within ``[min_replicas, max_replicas]``. A target that
   is outside them (someone scaled it by hand, or the bounds changed) is brought to the
   nearest bound at once -- no cooldown, step or rate limit delays that move; later moves
   follow the limits below;
2. **cooldowns**: a scale-up waits ``scale_up_cooldown_s`` after the last scale-up; a
   scale-down waits ``scale_down_cooldown_s`` after the last change in either direction
   (so a scale-up is never undone right away: the flapping guard);
3. **rate limit**: at most ``max_patches`` patches in any ``patch_window_s``;
4. **steps**: one decision moves at most ``max_step_up`` up / ``max_step_down`` down.

Each result says which limit shaped it (``limit``; ``None``: the policy's own number).
:class:`Actuator` holds the limits and the state (last scale-up, last change, recent
patches) and applies a plan through a :class:`ScaleWriter`, skipping the call when the plan
equals the current count. Times are on the controller's clock (:mod:`autoscale.clock`).

Example::

    actuator = Actuator(Limits(min_replicas=1, max_replicas=8), writer)
    plan = actuator.plan(desired=12, current=3, now=40.0)   # Plan(replicas=8, limit="max")
    await actuator.apply(plan, current=3, now=40.0)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

__all__ = [
    "LIMITS", "Actuator", "ActuatorState", "Limits", "Plan", "ScaleWriter", "clamp", "record",
]  # fmt: skip

LIMITS = ("min", "max", "scale_up_cooldown", "scale_down_cooldown", "rate_limit", "max_step")
"""Every :attr:`Plan.limit` (the ``limit`` label of ``switchyard_autoscaler_limited_*``)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the actuator may do. Example: ``Limits(min_replicas=1, max_replicas=8)``.

    ``None`` step limits: no step limit. ``max_patches`` 0: no rate limit."""

    min_replicas: int = 1
    max_replicas: int = 8
    max_step_up: int | None = None
    max_step_down: int | None = None
    scale_up_cooldown_s: float = 0.0
    scale_down_cooldown_s: float = 30.0
    max_patches: int = 0
    patch_window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 <= min_replicas <= max_replicas")
        for step in (self.max_step_up, self.max_step_down):
            if step is not None and step < 1:
                raise ValueError("a step limit must be >= 1")
        if min(self.scale_up_cooldown_s, self.scale_down_cooldown_s, self.max_patches) < 0:
            raise ValueError("cooldowns and max_patches must be >= 0")
        if self.patch_window_s <= 0:
            raise ValueError("patch_window_s must be > 0")


@dataclass(frozen=True, slots=True)
class ActuatorState:
    """What the limits remember: times of the last scale-up, the last change, recent patches."""

    last_up: float | None = None
    last_change: float | None = None
    patches: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """The replica count to set and the limit that shaped it (``None``: none did).

    ``desired`` is the policy's number, kept for logs and metrics."""

    replicas: int
    desired: int
    limit: str | None = None


def clamp(desired: int, *, current: int, now: float, limits: Limits, state: ActuatorState) -> Plan:
    """The replica count to set now for a policy's ``desired`` (see the module docstring)."""
    lo, hi = limits.min_replicas, limits.max_replicas
    bounded = min(hi, max(lo, desired))
    bound_limit = "max" if desired > hi else "min" if desired < lo else None
    if current < lo:  # out of bounds: to the nearest bound at once, nothing delays it
        return Plan(lo, desired, "min")
    if current > hi:
        return Plan(hi, desired, "max")
    if bounded == current:
        return Plan(current, desired, bound_limit)
    up = bounded > current
    if up and _within(state.last_up, now, limits.scale_up_cooldown_s):
        return Plan(current, desired, "scale_up_cooldown")
    if not up and _within(state.last_change, now, limits.scale_down_cooldown_s):
        return Plan(current, desired, "scale_down_cooldown")
    if limits.max_patches and _recent(state.patches, now, limits) >= limits.max_patches:
        return Plan(current, desired, "rate_limit")
    step = limits.max_step_up if up else limits.max_step_down
    if step is not None and abs(bounded - current) > step:
        return Plan(current + step if up else current - step, desired, "max_step")
    return Plan(bounded, desired, bound_limit)


def record(
    state: ActuatorState, *, current: int, replicas: int, now: float, limits: Limits
) -> ActuatorState:
    """The state after a patch from ``current`` to ``replicas`` landed at ``now``."""
    if replicas == current:
        return state
    recent = (*(t for t in state.patches if now - t < limits.patch_window_s), now)
    return replace(
        state,
        last_up=now if replicas > current else state.last_up,
        last_change=now,
        # bounded: only the last max_patches can ever matter
        patches=recent[-limits.max_patches :] if limits.max_patches else (),
    )


def _within(since: float | None, now: float, cooldown_s: float) -> bool:
    return since is not None and cooldown_s > 0 and now - since < cooldown_s


def _recent(patches: tuple[float, ...], now: float, limits: Limits) -> int:
    return sum(1 for t in patches if now - t < limits.patch_window_s)


class ScaleWriter(Protocol):
    """Sets the target's replicas (:class:`autoscale.kube.ScaleClient` is one)."""

    async def patch_replicas(self, replicas: int, *, timeout_s: float | None = None) -> object: ...


class Actuator:
    """The limits, their state and the writer; see the module docstring."""

    def __init__(self, limits: Limits, writer: ScaleWriter) -> None:
        self.limits = limits
        self.writer = writer
        self.state = ActuatorState()

    def plan(self, desired: int, *, current: int, now: float) -> Plan:
        return clamp(desired, current=current, now=now, limits=self.limits, state=self.state)

    async def apply(
        self, plan: Plan, *, current: int, now: float, timeout_s: float | None = None
    ) -> bool:
        """Patch the target to ``plan.replicas``; ``False`` (no call) when it equals
        ``current``. Errors propagate (the state is then unchanged)."""
        if plan.replicas == current:
            return False
        await self.writer.patch_replicas(plan.replicas, timeout_s=timeout_s)
        self.state = record(
            self.state, current=current, replicas=plan.replicas, now=now, limits=self.limits
        )
        return True
