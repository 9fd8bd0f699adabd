"""Scorers: one float in [0, 1] per endpoint, higher is better."""
