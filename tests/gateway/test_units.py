"""Unit tables: health thresholds, the model catalog, and the one httpx -> error mapping."""

from __future__ import annotations

import httpx
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
    with pytest.raises(RuntimeError), registry.lease(a, prompt_tokens=10):
        assert a.in_flight == 1
        raise RuntimeError("boom")
    assert a.in_flight == 0  # released on error too
    assert registry.next_seq() < registry.next_seq()


@pytest.mark.parametrize(
    ("raised", "expected", "retryable"),
    [
        (httpx.ConnectError("refused"), UpstreamUnavailable, True),
        (httpx.ConnectTimeout("slow"), UpstreamTimeout, True),
        (httpx.PoolTimeout("full"), UpstreamTimeout, True),
        (httpx.ReadTimeout("stalled"), UpstreamTimeout, False),
        (httpx.RemoteProtocolError("cut"), UpstreamUnavailable, True),
        (httpx.ReadError("reset"), UpstreamUnavailable, True),
        (httpx.TooManyRedirects("loop"), UpstreamProtocolError, False),
    ],
)
def test_httpx_errors_map_once(
    raised: Exception, expected: type[UpstreamError], retryable: bool
) -> None:
    with pytest.raises(expected) as info, map_upstream_errors("e1"):
        raise raised
    assert info.value.retryable is retryable
    assert info.value.__cause__ is raised
    assert "e1" in info.value.message
    assert info.value.status == (504 if expected is UpstreamTimeout else 502)
