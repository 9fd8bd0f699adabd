"""The actuator's limits as a table (plain float times), and the apply step with a fake writer."""

from __future__ import annotations

import pytest

from autoscale.actuator import Actuator, ActuatorState, Limits, Plan, clamp, record

L = Limits(min_replicas=1, max_replicas=10, scale_down_cooldown_s=0.0)
FRESH = ActuatorState()


@pytest.mark.parametrize(
    ("desired", "current", "now", "limits", "state", "expected"),
    [
        # in bounds, no limits in the way: the policy's number
        (5, 3, 100.0, L, FRESH, Plan(5, 5, None)),
        (2, 3, 100.0, L, FRESH, Plan(2, 2, None)),
        (3, 3, 100.0, L, FRESH, Plan(3, 3, None)),
        # bounds
        (50, 3, 100.0, L, FRESH, Plan(10, 50, "max")),
        (0, 3, 100.0, L, FRESH, Plan(1, 0, "min")),
        (0, 1, 100.0, L, FRESH, Plan(1, 0, "min")),  # already at min: no change
        (0, 0, 100.0, Limits(min_replicas=0, max_replicas=4), FRESH, Plan(0, 0, None)),
        # out of bounds: to the nearest bound at once, cooldowns and steps ignored
        (5, 0, 100.0, L, ActuatorState(last_up=99.0, last_change=99.0), Plan(1, 5, "min")),
        (12, 14, 100.0, Limits(max_replicas=10, max_step_down=1), FRESH, Plan(10, 12, "max")),
        # scale-up cooldown: since the last scale-up only
        (6, 3, 100.0, Limits(max_replicas=10, scale_up_cooldown_s=30),
         ActuatorState(last_up=80.0, last_change=80.0), Plan(3, 6, "scale_up_cooldown")),
        (6, 3, 110.0, Limits(max_replicas=10, scale_up_cooldown_s=30),
         ActuatorState(last_up=80.0, last_change=80.0), Plan(6, 6, None)),
        (6, 3, 100.0, Limits(max_replicas=10, scale_up_cooldown_s=30),
         ActuatorState(last_up=None, last_change=95.0), Plan(6, 6, None)),  # a scale-down
        # scale-down cooldown: since the last change, either direction
        (2, 4, 100.0, Limits(max_replicas=10, scale_down_cooldown_s=60),
         ActuatorState(last_up=70.0, last_change=70.0), Plan(4, 2, "scale_down_cooldown")),
        (2, 4, 100.0, Limits(max_replicas=10, scale_down_cooldown_s=60),
         ActuatorState(last_up=None, last_change=30.0), Plan(2, 2, None)),
        (2, 4, 100.0, Limits(max_replicas=10, scale_down_cooldown_s=60),
         ActuatorState(last_up=None, last_change=40.0), Plan(2, 2, None)),  # exactly 60 s ago
        # a cooldown of one direction never blocks the other
        (6, 4, 100.0, Limits(max_replicas=10, scale_down_cooldown_s=60),
         ActuatorState(last_up=99.0, last_change=99.0), Plan(6, 6, None)),
        # steps
        (9, 3, 100.0, Limits(max_replicas=10, max_step_up=2), FRESH, Plan(5, 9, "max_step")),
        (1, 8, 100.0, Limits(max_replicas=10, max_step_down=3, scale_down_cooldown_s=0),
         FRESH, Plan(5, 1, "max_step")),
        (5, 3, 100.0, Limits(max_replicas=10, max_step_up=2), FRESH, Plan(5, 5, None)),
        # a step limit and a bound: the step wins first (10 is two steps away)
        (50, 6, 100.0, Limits(max_replicas=10, max_step_up=2), FRESH, Plan(8, 50, "max_step")),
        # rate limit: 2 patches per 60 s
        (6, 3, 100.0, Limits(max_replicas=10, max_patches=2, patch_window_s=60),
         ActuatorState(patches=(50.0, 90.0)), Plan(3, 6, "rate_limit")),
        (6, 3, 100.0, Limits(max_replicas=10, max_patches=2, patch_window_s=60),
         ActuatorState(patches=(30.0, 90.0)), Plan(6, 6, None)),  # one is older than 60 s
        (3, 3, 100.0, Limits(max_replicas=10, max_patches=1, patch_window_s=60),
         ActuatorState(patches=(90.0,)), Plan(3, 3, None)),  # no change needs no patch
    ],
)  # fmt: skip
def test_clamp(
    desired: int, current: int, now: float, limits: Limits, state: ActuatorState, expected: Plan
) -> None:
    assert clamp(desired, current=current, now=now, limits=limits, state=state) == expected


def test_record_remembers_direction_and_bounded_patches() -> None:
    limits = Limits(max_replicas=10, max_patches=2, patch_window_s=60)
    state = record(ActuatorState(), current=2, replicas=4, now=10.0, limits=limits)
    assert state == ActuatorState(last_up=10.0, last_change=10.0, patches=(10.0,))
    state = record(state, current=4, replicas=3, now=20.0, limits=limits)
    assert state == ActuatorState(last_up=10.0, last_change=20.0, patches=(10.0, 20.0))
    state = record(state, current=3, replicas=5, now=30.0, limits=limits)
    assert state.patches == (20.0, 30.0)  # at most max_patches kept
    state = record(state, current=5, replicas=5, now=40.0, limits=limits)
    assert state.last_change == 30.0  # no change, nothing recorded
    state = record(state, current=5, replicas=6, now=200.0, limits=limits)
    assert state.patches == (200.0,)  # older than the window: dropped
    assert record(ActuatorState(), current=1, replicas=2, now=1.0, limits=Limits()).patches == ()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": -1},
        {"max_step_up": 0},
        {"max_step_down": 0},
        {"scale_up_cooldown_s": -1.0},
        {"max_patches": -1},
        {"patch_window_s": 0.0},
    ],
)
def test_limits_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)  # type: ignore[arg-type]


class FakeWriter:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[int, float | None]] = []
        self.fail = fail

    async def patch_replicas(self, replicas: int, *, timeout_s: float | None = None) -> object:
        self.calls.append((replicas, timeout_s))
        if self.fail is not None:
            raise self.fail
        return None


@pytest.mark.anyio
async def test_apply_skips_the_patch_when_nothing_changes() -> None:
    writer = FakeWriter()
    actuator = Actuator(Limits(max_replicas=10, scale_up_cooldown_s=30), writer)
    plan = actuator.plan(3, current=3, now=0.0)
    assert await actuator.apply(plan, current=3, now=0.0) is False
    assert writer.calls == []
    plan = actuator.plan(5, current=3, now=1.0)
    assert await actuator.apply(plan, current=3, now=1.0, timeout_s=2.0) is True
    assert writer.calls == [(5, 2.0)]
    assert actuator.state.last_up == 1.0
    # the cooldown now holds the next scale-up
    assert actuator.plan(7, current=5, now=10.0) == Plan(5, 7, "scale_up_cooldown")


@pytest.mark.anyio
async def test_a_failed_patch_changes_no_state() -> None:
    writer = FakeWriter(fail=RuntimeError("api down"))
    actuator = Actuator(Limits(max_replicas=10), writer)
    with pytest.raises(RuntimeError):
        await actuator.apply(actuator.plan(5, current=3, now=1.0), current=3, now=1.0)
    assert actuator.state == ActuatorState()
