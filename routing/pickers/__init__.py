"""Pickers: turn combined scores into a ranking (one module per picker)."""

from __future__ import annotations

from routing.pickers.basic import MaxScorePicker, RandomPicker, RoundRobinPicker, jitter
from routing.pickers.power_of_two import PowerOfTwoPicker

__all__ = ["MaxScorePicker", "PowerOfTwoPicker", "RandomPicker", "RoundRobinPicker", "jitter"]
