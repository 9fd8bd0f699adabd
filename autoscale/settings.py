"""The ``autoscaling:`` section of the configuration (the gateway's ``Settings`` holds it).

One section serves both ways of running the autoscaler: embedded in the gateway
(``enabled: true``; observations from the gateway's own counters) and standalone
(``switchyard autoscaler --config FILE`` reads the same section of the same file, whatever
``enabled`` says). Durations are float seconds named ``*_s``: the loop's (``interval_s``,
cooldowns, ``max_backoff_s``) on the autoscaler's clock, the I/O bounds
(``api_timeout_s``, ``scrape_timeout_s``, ``stale_after_s``, the lease's) in wall seconds.

Example (YAML)::

    autoscaling:
      enabled: true
      policy: kpa
      target: {name: llama-8b, namespace: serving}
      min_replicas: 1
      max_replicas: 8
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoscale.actuator import Limits
from autoscale.kube import ScaleTarget
from autoscale.policies import HPASettings, scales_from_zero
from autoscale.policies import build as build_policy

__all__ = ["AutoscalingSettings", "LeaderElectionSettings", "ScaleTargetSettings"]

# Kinds with a scale subresource whose plural is not just "<kind>s" lowercased.
_PLURALS = {"leaderworkerset": "leaderworkersets"}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScaleTargetSettings(_Section):
    """The resource whose ``scale`` subresource the autoscaler patches. ``resource`` is the
    plural path segment (default: ``kind`` lowercased + ``s``: ``deployments``)."""

    api_version: str = "apps/v1"
    kind: str = "Deployment"
    resource: str | None = None
    name: str = ""
    namespace: str = "default"

    def target(self) -> ScaleTarget:
        kind = self.kind.lower()
        resource = self.resource or _PLURALS.get(kind, f"{kind}s")
        return ScaleTarget(
            name=self.name,
            namespace=self.namespace,
            api_version=self.api_version,
            resource=resource,
        )


class LeaderElectionSettings(_Section):
    """A Lease so that one of several autoscalers (gateway replicas) actuates; client-go's
    durations by default. ``identity`` defaults to ``<hostname>_<pid>``; the lease's
    namespace to the target's."""

    enabled: bool = True
    lease_name: str = "switchyard-autoscaler"
    lease_namespace: str | None = None
    identity: str | None = None
    lease_duration_s: float = Field(default=15.0, gt=0)
    renew_deadline_s: float = Field(default=10.0, gt=0)
    retry_period_s: float = Field(default=2.0, gt=0)
    release_on_shutdown: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElectionSettings:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s:
            raise ValueError("need lease_duration_s > renew_deadline_s > retry_period_s")
        if self.lease_duration_s != int(self.lease_duration_s):
            raise ValueError("lease_duration_s must be whole seconds (the Lease field is)")
        return self

    def resolved_identity(self) -> str:
        return self.identity or f"{socket.gethostname()}_{os.getpid()}"


class AutoscalingSettings(_Section):
    """Everything the autoscaler reads; see docs/autoscaling.md (Configuration)."""

    enabled: bool = False
    policy: str = "kpa"
    policy_settings: dict[str, Any] = Field(default_factory=dict)
    target: ScaleTargetSettings = ScaleTargetSettings()
    # Embedded: count arrivals of this served model only (None: every model).
    model: str | None = None
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=8, ge=1)
    max_step_up: int | None = Field(default=None, ge=1)
    max_step_down: int | None = Field(default=None, ge=1)
    scale_up_cooldown_s: float = Field(default=0.0, ge=0)
    scale_down_cooldown_s: float = Field(default=30.0, ge=0)
    # At most max_patches scale patches in any patch_window_s (0: no rate limit).
    max_patches: int = Field(default=0, ge=0)
    patch_window_s: float = Field(default=60.0, gt=0)
    interval_s: float = Field(default=1.0, gt=0)
    # Simulated seconds per wall second of the autoscaler's clock (simulations only: the
    # benchmark's emulated cluster runs this much faster than wall time; 1: the wall clock).
    time_scale: float = Field(default=1.0, gt=0)
    max_backoff_s: float = Field(default=10.0, gt=0)
    # A ready pod without a successful scrape for this long makes the observation stale.
    stale_after_s: float = Field(default=5.0, gt=0)
    kubeconfig: Path | None = None  # unset: in-cluster, else ~/.kube/config
    context: str | None = None
    api_timeout_s: float = Field(default=5.0, gt=0)
    # Standalone: how the engines' /metrics are scraped.
    scrape_timeout_s: float = Field(default=1.0, gt=0)
    scrape_concurrency: int = Field(default=16, gt=0)
    metrics_path: str = "/metrics"
    port_annotation: str = "switchyard.io/port"
    default_port: int = Field(default=8000, gt=0, lt=65536)
    leader_election: LeaderElectionSettings = LeaderElectionSettings()

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= max_replicas")
        if self.enabled and not self.target.name:
            raise ValueError("autoscaling.target.name is required when autoscaling is enabled")
        if not self.metrics_path.startswith("/"):
            raise ValueError("autoscaling.metrics_path must start with /")
        build_policy(self.policy, self.policy_settings)  # fail at load, naming the problem
        if (
            self.enabled
            and self._may_reach_zero()
            and not scales_from_zero(self.policy, self.policy_settings)
        ):
            raise ValueError(
                f"autoscaling.min_replicas 0 with policy {self.policy!r}: it scales on per-pod "
                "signals and would never ask for a first replica again (no pod, no signal); "
                "use min_replicas >= 1, or a policy that scales from zero (proactive, or slo "
                "with prompt_tokens_per_s and output_tokens_per_s); docs/autoscaling.md"
            )
        return self

    def standalone_problem(self) -> str | None:
        """Why this section cannot run as ``switchyard autoscaler`` (None: it can).

        The standalone autoscaler estimates arrivals from the engines' counters: at zero
        pods it sees none, so any policy but ``static`` (or ``hpa`` with its own floor)
        would take the target to zero and leave it there. Scaling from zero needs the
        gateway-embedded autoscaler, which counts the requests it answers 503."""
        if not self.target.name:
            return "autoscaling.target.name is required"
        if self._may_reach_zero():
            return (
                "autoscaling.min_replicas 0 with the standalone autoscaler: it reads arrivals "
                "from the engines, so with no pod it sees none and would never ask for a "
                "first replica again; use min_replicas >= 1, or scale from zero with the "
                "gateway-embedded autoscaler (autoscaling.enabled; docs/autoscaling.md)"
            )
        return None

    def _may_reach_zero(self) -> bool:
        """The policy may take the target to zero pods: ``min_replicas`` 0, and neither
        ``static`` (it never moves) nor ``hpa`` with its own floor (default 1)."""
        if self.min_replicas != 0 or self.policy == "static":
            return False
        return (
            self.policy != "hpa"
            or HPASettings.model_validate(self.policy_settings).min_replicas == 0
        )

    def limits(self) -> Limits:
        return Limits(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            max_step_up=self.max_step_up,
            max_step_down=self.max_step_down,
            scale_up_cooldown_s=self.scale_up_cooldown_s,
            scale_down_cooldown_s=self.scale_down_cooldown_s,
            max_patches=self.max_patches,
            patch_window_s=self.patch_window_s,
        )

    @property
    def lease_namespace(self) -> str:
        return self.leader_election.lease_namespace or self.target.namespace
