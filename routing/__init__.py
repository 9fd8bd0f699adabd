"""Endpoint types, policies (filters, scorers, pickers) and the policy registry. Pure: no I/O."""

from __future__ import annotations

from routing.policy import Decision, NoEndpointError, Policy
from routing.registry import build_policies, builtin_policies
from routing.types import EndpointSnapshot, Filter, Picker, RouteRequest, Scorer

__all__ = [
    "Decision",
    "EndpointSnapshot",
    "Filter",
    "NoEndpointError",
    "Picker",
    "Policy",
    "RouteRequest",
    "Scorer",
    "build_policies",
    "builtin_policies",
]
