"""Observation sources with fakes: the standalone pod scraper over an httpx MockTransport,
freshness, the arrival counter and its rates."""

from __future__ import annotations

import httpx
import pytest

from autoscale.arrivals import OTHER_MODELS, ArrivalCounter, ArrivalTotals, RateMeter
from autoscale.kube import PodInfo, Scale
from autoscale.sources import Freshness, PodSource, TargetState
from routing.state import DEFAULT_OUTPUT_TOKENS

pytestmark = pytest.mark.anyio


def page(*, running: int, waiting: int, kv: float, finished: int, ttft: tuple[float, int],
         prompt: int = 0, generated: int = 0) -> str:  # fmt: skip
    return "\n".join(
        [
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="m"}} {running}',
            f'vllm:num_requests_waiting{{model_name="m"}} {waiting}',
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {kv}',
            f'vllm:request_success_total{{model_name="m",finished_reason="stop"}} {finished}',
            f'vllm:prompt_tokens_total{{model_name="m"}} {prompt}',
            f'vllm:generation_tokens_total{{model_name="m"}} {generated}',
            f'vllm:time_to_first_token_seconds_sum{{model_name="m"}} {ttft[0]}',
            f'vllm:time_to_first_token_seconds_count{{model_name="m"}} {ttft[1]}',
            "",
        ]
    )


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


class Reader:
    def __init__(self, pods: list[PodInfo], replicas: int = 3) -> None:
        self.pods = pods
        self.replicas = replicas

    async def read(self) -> TargetState:
        return TargetState(Scale(self.replicas, len(self.pods), "app=x"), tuple(self.pods))


def pod(name: str, ready: bool = True, port: str = "8001") -> PodInfo:
    return PodInfo(name, "10.0.0.1", ready, annotations={"switchyard.io/port": port})


async def test_pod_source_scrapes_ready_pods_and_estimates_rates() -> None:
    pages = {
        "8001": page(running=2, waiting=1, kv=0.25, finished=10, ttft=(1.0, 10), prompt=1000),
        "8002": page(running=0, waiting=0, kv=0.0, finished=0, ttft=(0.0, 0)),
    }
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        text = pages.get(str(request.url.port))
        return httpx.Response(200, text=text) if text else httpx.Response(503)

    errors: list[str] = []
    wall = [100.0]
    clock = Clock()
    reader = Reader([pod("a"), pod("b", port="8002"), pod("c", ready=False, port="8003")])
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        source = PodSource(reader=reader, http=http, clock=clock, stale_after_s=5.0,
                           on_error=errors.append, monotonic=lambda: wall[0])  # fmt: skip
        first = await source.observe()
        assert sorted(asked) == ["http://10.0.0.1:8001/metrics", "http://10.0.0.1:8002/metrics"]
        assert (first.current, first.ready, first.stale) == (3, 2, False)
        a, b, c = first.engines
        assert (a.id, a.running, a.waiting, a.kv_usage, a.ttft_s) == ("a", 2.0, 1.0, 0.25, 0.1)
        assert b.ttft_s is None  # no samples yet
        assert (c.ready, c.running) == (False, 0.0)  # not ready: not scraped
        assert first.arrival_rate == 0.0  # no baseline yet

        # two seconds later: 4 more finished, 2 more in the system, 6 TTFT samples of 0.5 s
        pages["8001"] = page(running=3, waiting=2, kv=0.5, finished=14, ttft=(4.0, 16),
                             prompt=3000)  # fmt: skip
        clock.t, wall[0] = 2.0, 102.0
        second = await source.observe()
        a = second.engines[0]
        assert a.ttft_s == pytest.approx(0.5)
        assert second.arrival_rate == pytest.approx((4 + 2) / 2.0)
        assert second.prompt_token_rate == pytest.approx(1000.0)
        assert errors == []

        # pod b stops answering: its last metrics serve until stale_after_s has passed
        del pages["8002"]
        clock.t, wall[0] = 3.0, 104.0
        third = await source.observe()
        assert not third.stale and errors == ["metrics"]
        clock.t, wall[0] = 4.0, 108.0
        fourth = await source.observe()
        assert fourth.stale and errors == ["metrics", "metrics"]

        # b goes away: the rest is fresh again
        reader.pods = reader.pods[:1]
        clock.t, wall[0] = 5.0, 109.0
        assert not (await source.observe()).stale


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="vllm:num_requests_running{ 3\n"),  # not exposition format
        httpx.Response(200, text="up 1\n"),  # not an engine's page
        httpx.Response(200, text="vllm:num_requests_running 1\n" + "#" * 5_000_000),  # huge
        httpx.Response(500, text="vllm:num_requests_running 1\n"),
    ],
)
async def test_pod_source_rejects_bad_pages(answer: httpx.Response) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return answer

    errors: list[str] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        source = PodSource(reader=Reader([pod("a")]), http=http, clock=Clock(),
                           on_error=errors.append)  # fmt: skip
        got = await source.observe()
    assert errors == ["metrics"] and got.engines[0].kv_usage is None


def test_freshness_gives_new_pods_a_grace_period() -> None:
    wall = [0.0]
    fresh = Freshness(5.0, monotonic=lambda: wall[0])
    assert not fresh.stale(["a"], {})  # just seen ready, never scraped: fine for now
    wall[0] = 4.0
    assert not fresh.stale(["a"], {})
    wall[0] = 6.0
    assert fresh.stale(["a"], {})  # 6 s without a scrape
    assert not fresh.stale(["a"], {"a": 5.0})
    assert fresh.stale(["a"], {"a": 0.5})
    assert not fresh.stale([], {})  # nothing ready: nothing to be stale


def test_arrival_counter_and_rates() -> None:
    counter = ArrivalCounter(max_models=2)
    counter.arrived("a", prompt_tokens=100, max_tokens=10)
    counter.arrived("a", prompt_tokens=50, max_tokens=None)
    counter.arrived("b", prompt_tokens=1, max_tokens=1)
    counter.arrived("c", prompt_tokens=7, max_tokens=3)  # beyond max_models: pooled
    assert counter.totals("a") == ArrivalTotals(2, 150, 10 + DEFAULT_OUTPUT_TOKENS)
    assert counter.totals(OTHER_MODELS) == ArrivalTotals(1, 7, 3)
    assert counter.totals("zzz") == ArrivalTotals()
    assert counter.totals().requests == 4
    meter = RateMeter()
    assert meter.rates(ArrivalTotals(10, 1000, 500), now=1.0) == (0.0, 0.0, 0.0)
    assert meter.rates(ArrivalTotals(14, 1400, 700), now=3.0) == (2.0, 200.0, 100.0)
    assert meter.rates(ArrivalTotals(14, 1400, 700), now=3.0) == (0.0, 0.0, 0.0)  # no time


async def test_a_pod_with_an_unusable_address_is_a_failed_scrape() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    errors: list[str] = []
    odd = PodInfo("a", "not a host/\x00", True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        source = PodSource(reader=Reader([odd]), http=http, clock=Clock(), on_error=errors.append)
        got = await source.observe()
    assert errors == ["metrics"] and got.ready == 1
