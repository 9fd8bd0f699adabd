"""Endpoint types, policies (filters, scorers, pickers) and the policy registry. Pure: no I/O."""

from __future__ import annotations

from routing.fairness import VirtualTokenCounters
from routing.metrics_parser import (
    WANTED_SERIES,
    EngineMetrics,
    MetricsParseError,
    parse_vllm_metrics,
)
from routing.policy import Decision, NoEndpointError, Policy
from routing.registry import (
    ProfileError,
    build_policies,
    build_profile,
    builtin_plugins,
    builtin_policies,
)
from routing.state import EngineState, Ticket
from routing.types import (
    EndpointSnapshot,
    FairnessView,
    Filter,
    Picker,
    RouteRequest,
    Scorer,
)

__all__ = [
    "WANTED_SERIES",
    "Decision",
    "EndpointSnapshot",
    "EngineMetrics",
    "EngineState",
    "FairnessView",
    "Filter",
    "MetricsParseError",
    "NoEndpointError",
    "Picker",
    "Policy",
    "ProfileError",
    "RouteRequest",
    "Scorer",
    "Ticket",
    "VirtualTokenCounters",
    "build_policies",
    "build_profile",
    "builtin_plugins",
    "builtin_policies",
    "parse_vllm_metrics",
]
