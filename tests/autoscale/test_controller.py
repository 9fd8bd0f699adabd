"""The decision loop with fakes: holds on errors and stale data, leadership gates patches,
backoff, bounded reason labels, the run loop on a fake clock."""

from __future__ import annotations

import logging
import time

import anyio
import pytest
from prometheus_client import CollectorRegistry

from autoscale.actuator import Actuator, Limits
from autoscale.clock import ScaledClock
from autoscale.controller import Controller, ObservationError
from autoscale.kube import KubeConflict, KubeUnavailable
from autoscale.metrics import MAX_REASONS, AutoscalerMetrics
from autoscale.signals import Decision, EngineSignals, Observation

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        await anyio.lowlevel.checkpoint()


class FakeSource:
    """Serves a scripted list of observations or errors, one per observe()."""

    def __init__(self, clock: FakeClock, script: list[Observation | Exception]) -> None:
        self.clock = clock
        self.script = script
        self.current = 2

    async def observe(self) -> Observation:
        item = self.script.pop(0) if self.script else Observation(now=0, current=0, ready=0)
        if isinstance(item, Exception):
            raise item
        return Observation(
            now=self.clock.now(),
            current=self.current,
            ready=item.ready,
            engines=item.engines,
            arrival_rate=item.arrival_rate,
            stale=item.stale,
        )


class FakeWriter:
    def __init__(self, source: FakeSource) -> None:
        self.source = source
        self.calls: list[tuple[int, float | None]] = []
        self.fail: Exception | None = None

    async def patch_replicas(self, replicas: int, *, timeout_s: float | None = None) -> object:
        self.calls.append((replicas, timeout_s))
        if self.fail is not None:
            raise self.fail
        self.source.current = replicas
        return None


class Policy:
    name = "fake"

    def __init__(self, want: int, *, reason: str = "scale_up", panic: bool = False) -> None:
        self.want = want
        self.reason = reason
        self.panic = panic
        self.seen: list[Observation] = []
        self.boom = False

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        if self.boom:
            raise ZeroDivisionError("bug")
        return Decision(self.want, self.reason, panic=self.panic)


class FakeElector:
    def __init__(self, leading: bool, window: float = 10.0) -> None:
        self.leading = leading
        self.window = window

    def is_leader(self) -> bool:
        return self.leading

    def safe_window_s(self) -> float:
        return self.window if self.leading else 0.0

    async def run(self) -> None:
        await anyio.sleep_forever()


def setup(
    script: list[Observation | Exception] | None = None,
    *,
    want: int = 4,
    elector: FakeElector | None = None,
    limits: Limits | None = None,
) -> tuple[Controller, FakeSource, FakeWriter, Policy, CollectorRegistry]:
    clock = FakeClock()
    source = FakeSource(clock, script or [])
    writer = FakeWriter(source)
    policy = Policy(want)
    registry = CollectorRegistry()
    ctl = Controller(
        source=source,
        policy=policy,
        actuator=Actuator(limits or Limits(max_replicas=10, scale_down_cooldown_s=0), writer),
        metrics=AutoscalerMetrics(registry, policy="fake"),
        elector=elector,
        clock=clock,
        interval_s=1.0,
        max_backoff_s=8.0,
        patch_timeout_s=5.0,
        target="deployments/default/x",
    )
    return ctl, source, writer, policy, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def obs(**kwargs: object) -> Observation:
    return Observation(now=0.0, current=0, ready=2, **kwargs)  # type: ignore[arg-type]


async def test_a_good_tick_patches_and_exports() -> None:
    engines = (EngineSignals("p0", True, waiting=3, in_flight=5, queued_prompt_tokens=700),)
    ctl, source, writer, policy, reg = setup([obs(engines=engines, arrival_rate=4.0)])
    tick = await ctl.tick()
    assert tick.patched and not tick.held and writer.calls == [(4, 5.0)]
    assert source.current == 4
    assert sample(reg, "switchyard_autoscaler_desired_replicas") == 4
    assert sample(reg, "switchyard_autoscaler_current_replicas") == 2  # as observed
    assert sample(reg, "switchyard_autoscaler_ready_replicas") == 2
    assert sample(reg, "switchyard_autoscaler_decisions_total", policy="fake",
                  reason="scale_up") == 1  # fmt: skip
    assert sample(reg, "switchyard_autoscaler_scale_patches_total") == 1
    assert sample(reg, "switchyard_autoscaler_leader_ratio") == 1
    assert sample(reg, "switchyard_autoscaler_arrivals_per_second") == 4.0
    assert sample(reg, "switchyard_autoscaler_in_flight_requests") == 5
    assert sample(reg, "switchyard_autoscaler_queued_prompt_tokens") == 700
    assert sample(reg, "switchyard_autoscaler_waiting_requests") == 3
    tick = await ctl.tick()  # desired == current now: no call
    assert not tick.patched and len(writer.calls) == 1


@pytest.mark.parametrize(
    ("failure", "kind", "reason"),
    [
        (ObservationError("pods: 500", kind="api"), "api", "error_api"),
        (ObservationError("scrapes failed", kind="metrics"), "metrics", "error_metrics"),
        (KubeUnavailable("GET scale: timeout"), "api", "error_api"),
    ],
)
async def test_observation_errors_hold_and_back_off(
    failure: Exception, kind: str, reason: str
) -> None:
    ctl, _, writer, policy, reg = setup([failure, failure, failure, obs()])
    delays = []
    for _ in range(3):
        tick = await ctl.tick()
        assert tick.held and tick.error == kind and tick.decision.reason == reason
        delays.append(ctl.next_delay())
    assert delays == [2.0, 4.0, 8.0]  # x2 per held tick, capped at max_backoff_s
    assert writer.calls == [] and policy.seen == []
    assert sample(reg, "switchyard_autoscaler_errors_total", kind=kind) == 3
    assert sample(reg, "switchyard_autoscaler_holding_ratio") == 1
    assert sample(reg, "switchyard_autoscaler_decisions_total", policy="fake", reason=reason) == 3
    tick = await ctl.tick()  # recovered: acts, and the backoff resets
    assert tick.patched and ctl.next_delay() == 1.0
    assert sample(reg, "switchyard_autoscaler_holding_ratio") == 0


async def test_stale_observations_hold_whatever_the_policy_says() -> None:
    ctl, _, writer, policy, reg = setup([obs(stale=True)], want=9)
    tick = await ctl.tick()
    assert tick.held and tick.decision == Decision(2, "stale") and writer.calls == []
    assert len(policy.seen) == 1  # the policy saw it (its windows follow time)
    assert sample(reg, "switchyard_autoscaler_errors_total", kind="metrics") == 1


async def test_a_policy_that_raises_is_held_on() -> None:
    ctl, _, writer, policy, reg = setup([obs()])
    policy.boom = True
    tick = await ctl.tick()
    assert tick.held and tick.error == "policy" and writer.calls == []
    assert sample(reg, "switchyard_autoscaler_errors_total", kind="policy") == 1


@pytest.mark.parametrize("failure", [KubeConflict("409"), KubeUnavailable("500")])
async def test_a_failed_patch_holds(failure: Exception) -> None:
    ctl, source, writer, _, reg = setup([obs()])
    writer.fail = failure
    tick = await ctl.tick()
    assert tick.held and tick.error == "api" and not tick.patched
    assert source.current == 2 and ctl.actuator.state.last_change is None
    assert sample(reg, "switchyard_autoscaler_scale_patches_total") == 0


async def test_only_the_leader_patches_within_its_safe_window() -> None:
    follower = FakeElector(False)
    ctl, _, writer, _, reg = setup([obs(), obs(), obs()], elector=follower)
    tick = await ctl.tick()
    assert not tick.patched and not tick.leader and writer.calls == []
    assert sample(reg, "switchyard_autoscaler_leader_ratio") == 0
    assert sample(reg, "switchyard_autoscaler_desired_replicas") == 4  # still decides
    follower.leading, follower.window = True, 0.01  # leading, but no time left for a patch
    tick = await ctl.tick()
    assert not tick.patched and writer.calls == []
    follower.window = 1.5
    tick = await ctl.tick()
    assert tick.patched and writer.calls == [(4, 1.5)]  # the timeout cut to the window
    assert sample(reg, "switchyard_autoscaler_leader_ratio") == 1


async def test_panic_and_limits_are_exported() -> None:
    ctl, _, writer, policy, reg = setup([obs()], want=50, limits=Limits(max_replicas=6))
    policy.panic = True
    await ctl.tick()
    assert writer.calls == [(6, 5.0)]
    assert sample(reg, "switchyard_autoscaler_panic_ratio") == 1
    assert sample(reg, "switchyard_autoscaler_recommended_replicas") == 50
    assert sample(reg, "switchyard_autoscaler_limited_decisions_total", limit="max") == 1


def test_reason_labels_are_bounded() -> None:
    metrics = AutoscalerMetrics(CollectorRegistry(), policy="p")
    assert metrics.reason_label("scale_up") == "scale_up"
    assert metrics.reason_label("Scale Up!") == "other"
    assert metrics.reason_label("x" * 80) == "other"
    for i in range(MAX_REASONS * 2):
        metrics.reason_label(f"r{i}")
    assert metrics.reason_label("brand_new") == "other"
    assert metrics.reason_label("scale_up") == "scale_up"  # known ones stay


async def test_run_ticks_on_the_clock_and_logs_each_decision(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failure = ObservationError("down")
    ctl, _, writer, _, _ = setup([obs(), failure, obs(), obs()])
    clock = ctl.clock
    assert isinstance(clock, FakeClock)
    caplog.set_level(logging.DEBUG, logger="autoscale.controller")
    with anyio.move_on_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctl.run)
            while len(clock.sleeps) < 4:
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    assert clock.sleeps[:3] == [1.0, 2.0, 1.0]  # the interval, a backoff, the interval
    assert writer.calls == [(4, 5.0)]
    lines = [r.getMessage() for r in caplog.records]
    assert any("reason=scale_up" in line and "desired=4" in line and "current=2" in line
               and "ready=2" in line for line in lines)  # fmt: skip
    assert any("autoscaler hold" in line and "reason=error_api" in line for line in lines)


async def test_scaled_clock_runs_simulated_seconds() -> None:
    clock = ScaledClock(speed=10.0, origin=time.monotonic() - 1.0)
    assert clock.now() >= 10.0  # one wall second is ten simulated ones
    before = clock.now()
    await clock.sleep(0.5)  # 0.05 s of wall time
    assert clock.now() - before >= 0.5
    with pytest.raises(ValueError):
        ScaledClock(speed=0.0)
