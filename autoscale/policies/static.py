"""The over-provisioned baseline: always the configured replicas.

policy = StaticPolicy(StaticSettings(replicas=8))
"""

from __future__ import annotations

from pydantic import Field

from autoscale.policies._common import PolicySettings, hold
from autoscale.signals import Decision, Observation

__all__ = ["StaticPolicy", "StaticSettings"]

REASONS = ("stale", "hold", "static")


class StaticSettings(PolicySettings):
    """`StaticSettings(replicas=8)`."""

    replicas: int = Field(default=1, ge=0)


class StaticPolicy:
    """Always `settings.replicas` ("static"); holds on stale metrics like every policy."""

    name = "static"

    def __init__(self, settings: StaticSettings | None = None) -> None:
        self.settings = settings or StaticSettings()

    def decide(self, obs: Observation) -> Decision:
        if obs.stale:
            return hold(obs, "stale")
        if obs.current == self.settings.replicas:
            return hold(obs, "hold")
        return Decision(desired=self.settings.replicas, reason="static")
