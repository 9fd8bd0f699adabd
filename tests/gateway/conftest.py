"""Fixtures: fake engines and a gateway, each a real server on a free loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import EngineConfig, Settings
from tests.gateway.fakeupstream import FakeEngine
from tests.gateway.servers import ServerThread


def gateway_settings(urls: list[str], **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "engines": [EngineConfig(url=url) for url in urls],
        "health": {"interval_s": 0.1, "timeout_s": 1.0, "fail_threshold": 2,
                   "success_threshold": 1},
        "routing": {"policy": "round-robin", "debug_header": True},
        "server": {"access_log": False},
        "proxy": {"connect_timeout_s": 1.0, "read_timeout_s": 10.0},
    }  # fmt: skip
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Settings(**base)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


StartEngines = Callable[..., list[tuple[FakeEngine, ServerThread]]]
StartGateway = Callable[..., ServerThread]


@pytest.fixture
def start_engines(stack: ExitStack) -> StartEngines:
    def start(n: int = 2, **attrs: Any) -> list[tuple[FakeEngine, ServerThread]]:
        out = []
        for i in range(n):
            engine = FakeEngine(name=f"e{i}", **attrs)
            out.append((engine, stack.enter_context(ServerThread(engine))))
        return out

    return start


@pytest.fixture
def start_gateway(stack: ExitStack) -> StartGateway:
    def start(urls: list[str], **overrides: Any) -> ServerThread:
        settings = gateway_settings(urls, **overrides)
        return stack.enter_context(ServerThread(create_app(settings)))

    return start


@pytest.fixture
def client(stack: ExitStack) -> httpx.Client:
    return stack.enter_context(httpx.Client(timeout=30.0))
