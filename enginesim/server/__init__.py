"""The async, vLLM-compatible HTTP server of the simulated engine (one app per engine)."""

from __future__ import annotations

from enginesim.server.app import create_engine_app
from enginesim.server.faults import FaultInjector, Faults
from enginesim.server.runtime import EngineRuntime, EngineSpec, TextCodec

__all__ = [
    "EngineRuntime",
    "EngineSpec",
    "FaultInjector",
    "Faults",
    "TextCodec",
    "create_engine_app",
]
