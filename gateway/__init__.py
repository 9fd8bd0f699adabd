"""Switchyard's gateway: an OpenAI-compatible, LLM-aware proxy in front of vLLM engines.

Example::

    from gateway import Settings, create_app
    app = create_app(Settings.load("switchyard.yaml"))
"""

from __future__ import annotations

from gateway.app import create_app
from gateway.exchange import FinishedRequest, RequestObserver
from gateway.services import Services
from gateway.settings import Settings

__all__ = ["FinishedRequest", "RequestObserver", "Services", "Settings", "create_app"]
