"""StaticPolicy: always the configured replicas."""

from __future__ import annotations

import pytest

from autoscale.policies.static import StaticPolicy, StaticSettings
from tests.autoscale.helpers import obs


@pytest.mark.parametrize(
    ("current", "stale", "desired", "reason"),
    [
        (2, False, 8, "static"),
        (8, False, 8, "hold"),
        (12, False, 8, "static"),
        (2, True, 2, "stale"),
    ],
)
def test_static(current: int, stale: bool, desired: int, reason: str) -> None:
    decision = StaticPolicy(StaticSettings(replicas=8)).decide(obs(0.0, current, stale=stale))
    assert (decision.desired, decision.reason) == (desired, reason)
