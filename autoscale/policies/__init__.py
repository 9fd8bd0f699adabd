"""The scaling policies and their registry.

Each policy is a class implementing `autoscale.signals.Policy` with a frozen settings model
carrying its documented defaults; `build` makes one from a name and a plain mapping (a config
section), rejecting unknown names and unknown settings:

    policy = build("hpa", {"metric": "kv"})
    policy = build("proactive", {"prompt_tokens_per_s": 8000, "lead_time_s": 150})

Names: hpa (Kubernetes HPA, `metric: waiting | kv`), kpa (Knative), apa (AIBrix APA),
proactive and slo (ours), static (fixed replicas).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from autoscale.policies.apa import APAPolicy, APASettings
from autoscale.policies.hpa import HPAPolicy, HPASettings
from autoscale.policies.kpa import KPAPolicy, KPASettings
from autoscale.policies.proactive import ProactivePolicy, ProactiveSettings
from autoscale.policies.slo import SLOPolicy, SLOSettings
from autoscale.policies.static import StaticPolicy, StaticSettings
from autoscale.signals import Observation, Policy

__all__ = [
    "NAMES",
    "APAPolicy",
    "APASettings",
    "HPAPolicy",
    "HPASettings",
    "KPAPolicy",
    "KPASettings",
    "ProactivePolicy",
    "ProactiveSettings",
    "SLOPolicy",
    "SLOSettings",
    "StaticPolicy",
    "StaticSettings",
    "build",
    "scales_from_zero",
]

_BUILDERS: Mapping[str, Callable[[Mapping[str, Any]], Policy]] = MappingProxyType(
    {
        "hpa": lambda raw: HPAPolicy(HPASettings.model_validate(raw)),
        "kpa": lambda raw: KPAPolicy(KPASettings.model_validate(raw)),
        "apa": lambda raw: APAPolicy(APASettings.model_validate(raw)),
        "proactive": lambda raw: ProactivePolicy(ProactiveSettings.model_validate(raw)),
        "slo": lambda raw: SLOPolicy(SLOSettings.model_validate(raw)),
        "static": lambda raw: StaticPolicy(StaticSettings.model_validate(raw)),
    }
)

NAMES = tuple(_BUILDERS)


def build(name: str, settings: Mapping[str, Any] | None = None) -> Policy:
    """A fresh policy (its own windows) from a registry name and its settings.

    Raises ValueError for an unknown name and pydantic's ValidationError (a ValueError) for
    unknown or invalid settings."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        known = ", ".join(NAMES)
        raise ValueError(f"unknown autoscaling policy {name!r}; known: {known}") from None
    return builder(dict(settings or {}))


_PROBE_TICKS = 30  # simulated seconds of steady demand offered to a policy at zero replicas


def scales_from_zero(name: str, settings: Mapping[str, Any] | None = None) -> bool:
    """Whether policy ``name`` asks for a first replica when its target sits at zero.

    At zero replicas no pod exists, so the only signals are the arrivals the gateway counts
    (requests it answered ``503 no_healthy_endpoint`` included): a fresh policy is offered 30
    simulated seconds of steady demand (2 req/s, 1,000 prompt and 256 output tokens each)
    and must ask for a replica. True for ``proactive`` and ``slo`` with token capacities;
    False for ``hpa``, ``kpa``, ``apa`` (per-pod signals) and ``slo`` on latency alone.
    ``static`` asks for its fixed count whatever the load (True when that count is >= 1).
    Raises as :func:`build` does.
    """
    policy = build(name, settings)
    for tick in range(_PROBE_TICKS):
        obs = Observation(
            now=float(tick), current=0, ready=0, engines=(), arrival_rate=2.0,
            prompt_token_rate=2000.0, output_token_rate=512.0,
        )  # fmt: skip
        if policy.decide(obs).desired > 0:
            return True
    return False
