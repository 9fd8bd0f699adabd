"""Filters: which endpoints may serve a request at all (one module per filter)."""

from __future__ import annotations

from routing.filters.basic import Healthy, ServesModel
from routing.filters.lora import ServesAdapter
from routing.filters.saturation import NotSaturated
from routing.filters.slow import NotSlow

__all__ = ["Healthy", "NotSaturated", "NotSlow", "ServesAdapter", "ServesModel"]
