"""Endpoint types, policies (filters, scorers, pickers) and the policy registry. Pure: no I/O."""

from __future__ import annotations

from routing.policy import Decision, NoEndpointError, Policy
from routing.registry import (
    ProfileError,
    build_policies,
    build_profile,
    builtin_plugins,
    builtin_policies,
)
from routing.types import (
    EndpointSnapshot,
    FairnessView,
    Filter,
    Picker,
    RouteRequest,
    Scorer,
)

__all__ = [
    "Decision",
    "EndpointSnapshot",
    "FairnessView",
    "Filter",
    "NoEndpointError",
    "Picker",
    "Policy",
    "ProfileError",
    "RouteRequest",
    "Scorer",
    "build_policies",
    "build_profile",
    "builtin_plugins",
    "builtin_policies",
]
