"""Shared pytest configuration: anyio tests run on asyncio; a real redis-server per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh real redis-server on a free port for this test."""
    with RedisServer() as server:
        yield server
