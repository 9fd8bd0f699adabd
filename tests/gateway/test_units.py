"""Unit tables: health thresholds, the model catalog, the one upstream error mapping."""

from __future__ import annotations

from types import SimpleNamespace

import aiohttp
import pytest

from gateway.endpoints import EndpointRegistry, Health, ModelCard
from gateway.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
    map_upstream_errors,
)


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([True], Health.HEALTHY),  # the first probe decides
        ([False], Health.UNHEALTHY),
        ([True, False, False], Health.HEALTHY),  # 2 failures < threshold 3
        ([True, False, False, False], Health.UNHEALTHY),
        ([True, False, True, False, False], Health.HEALTHY),  # failures must be consecutive
        ([False, True], Health.UNHEALTHY),  # 1 success < threshold 2
        ([False, True, True], Health.HEALTHY),
    ],
)
def test_health_thresholds(outcomes: list[bool], expected: Health) -> None:
    state = EndpointRegistry().add("http://e:1")
    for ok in outcomes:
        state.record_probe(ok, fail_threshold=3, success_threshold=2)
    assert state.health is expected
    assert state.snapshot().healthy is (expected is Health.HEALTHY)


def test_catalog_and_leases() -> None:
    registry = EndpointRegistry()
    a = registry.add("http://a:1")
    b = registry.add("http://b:1", endpoint_id="b", models=["static"])
    a.set_models([ModelCard("base"), ModelCard("lora", parent="base")])
    a.record_probe(True, fail_threshold=1, success_threshold=1)
    b.record_probe(False, fail_threshold=1, success_threshold=1)
    catalog = registry.catalog()
    assert set(catalog) == {"base", "lora", "static"}
    assert catalog["lora"].card.parent == "base" and catalog["lora"].healthy
    assert not catalog["static"].healthy  # listed only by an unhealthy engine
    with pytest.raises(KeyError):
        registry.add("http://b:1", endpoint_id="b")
    with pytest.raises(RuntimeError), a.lease(prompt_tokens=10):
        assert a.in_flight == 1
        raise RuntimeError("boom")
    assert a.in_flight == 0  # released on error too
    assert registry.next_seq() < registry.next_seq()


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    key = SimpleNamespace(host="127.0.0.1", port=1, ssl=False)
    return aiohttp.ClientConnectorError(key, os_error)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raised", "expected", "retryable"),
    [
        (_connector_error(ConnectionRefusedError(111, "refused")), UpstreamUnavailable, True),
        (aiohttp.ConnectionTimeoutError("slow"), UpstreamTimeout, True),
        (aiohttp.SocketTimeoutError("stalled"), UpstreamTimeout, False),
        (TimeoutError(), UpstreamTimeout, False),  # aiohttp's total timeout
        (aiohttp.ServerDisconnectedError(), UpstreamUnavailable, True),
        (aiohttp.ClientOSError(104, "reset"), UpstreamUnavailable, True),
        (aiohttp.ClientPayloadError("cut"), UpstreamUnavailable, True),
        (aiohttp.InvalidURL("x"), UpstreamProtocolError, False),
    ],
)
def test_upstream_errors_map_once(
    raised: Exception, expected: type[UpstreamError], retryable: bool
) -> None:
    with pytest.raises(expected) as info, map_upstream_errors("e1"):
        raise raised
    assert info.value.retryable is retryable
    assert info.value.__cause__ is raised
    assert "e1" in info.value.message
    assert info.value.status == (504 if expected is UpstreamTimeout else 502)


def test_catalog_cache_follows_every_change() -> None:
    registry = EndpointRegistry()
    a = registry.add("http://a:1", models=["m"])
    assert not registry.catalog()["m"].healthy
    a.record_probe(True, fail_threshold=1, success_threshold=1)
    assert registry.catalog()["m"].healthy  # health changed
    assert registry.catalog() is registry.catalog()  # nothing changed: the same object
    a.set_models([ModelCard("m"), ModelCard("lora", parent="m")])
    assert set(registry.catalog()) == {"m", "lora"}  # models changed
    registry.add("http://b:1", endpoint_id="b", models=["other"])
    assert set(registry.catalog()) == {"m", "lora", "other"}  # added
    registry.remove("b")
    assert set(registry.catalog()) == {"m", "lora"}  # removed
