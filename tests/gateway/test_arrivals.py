"""Where a gateway counts arrivals for the embedded autoscaler, through a real gateway.

Once per client request that gets past authentication, validation and its limits, before
any admission wait: routed ones once (however many engines it tried), shed ones and those
no engine could serve too; refused ones (401, 400, 404, 429) never. The gateway's
:class:`Services` is built by the test with a counter, as ``Services.build`` does when
``autoscaling.enabled`` (which also needs a Kubernetes API, not wanted here).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from autoscale.arrivals import ArrivalCounter, ArrivalTotals
from gateway.app import create_app
from gateway.endpoints import ModelCard
from gateway.services import Services
from tests.gateway.conftest import StartEngines, gateway_settings
from tests.gateway.fakeupstream import FakeEngine
from tests.gateway.servers import ServerThread, wait_until

MODEL = "fake-model"
KEY, LIMITED = "k-plain-0001", "k-limited-01"
PROMPT = 2  # "hello": 5 characters, 2 tokens at 4 characters a token (the estimate)


def _gateway(
    stack: ExitStack, urls: list[str], *, healthy: bool = True, **overrides: Any
) -> tuple[str, ArrivalCounter]:
    """A gateway over ``urls`` counting arrivals; its engines healthy and listing MODEL
    (``healthy=False``: never probed, so none serves anything)."""
    services = Services.build(gateway_settings(urls, **overrides))
    if healthy:
        for state in services.endpoints:
            state.record_probe(True, fail_threshold=1, success_threshold=1)
            state.set_models([ModelCard(MODEL)])
    counter = services.router.arrivals = ArrivalCounter()
    app = create_app(services.settings, services=services)
    return stack.enter_context(ServerThread(app)).url, counter


def _chat(
    client: httpx.Client,
    url: str,
    key: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 7, "messages": [{"role": "user", "content": "hello"}]}
    headers = {**({"authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return client.post(f"{url}/v1/chat/completions", json={**body, **extra}, headers=headers)


def _counted(counter: ArrivalCounter, n: int) -> bool:
    return counter.totals(MODEL) == ArrivalTotals(n, n * PROMPT, n * 7)


def test_a_routed_request_counts_once_even_after_failover(
    start_engines: StartEngines, stack: ExitStack, client: httpx.Client
) -> None:
    (bad, bad_srv), (good, good_srv) = start_engines(2)
    bad.status = 503  # every request it gets fails over to the other engine
    url, counter = _gateway(stack, [bad_srv.url, good_srv.url])
    answers = [_chat(client, url) for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert bad.requests >= 1 and good.requests == 4  # some tried two engines
    assert _counted(counter, 4)


def test_a_waiting_request_counts_as_it_arrives_and_once_when_routed(
    start_engines: StartEngines, stack: ExitStack, client: httpx.Client
) -> None:
    ((engine, srv),) = start_engines(1, ttft=1.0)
    url, counter = _gateway(
        stack, [srv.url], admission={"max_per_engine": 1, "queue_timeout_s": 30.0}
    )
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_chat, client, url)
        assert wait_until(lambda: engine.running == 1)
        second = pool.submit(_chat, client, url)  # waits in the admission queue...
        assert wait_until(lambda: _counted(counter, 2))  # ...counted already
        assert engine.requests == 1
        assert [first.result().status_code, second.result().status_code] == [200, 200]
    assert engine.requests == 2 and _counted(counter, 2)  # routed after waiting: still one


@pytest.mark.parametrize(
    "admission",
    [{"max_per_engine": 1, "queue_size": 0}, {"max_per_engine": 1, "queue_timeout_s": 0.05}],
)
def test_a_shed_request_counts(
    start_engines: StartEngines, stack: ExitStack, client: httpx.Client, admission: dict[str, Any]
) -> None:
    ((engine, srv),) = start_engines(1, ttft=1.0)
    url, counter = _gateway(stack, [srv.url], admission=admission)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(_chat, client, url)
        assert wait_until(lambda: engine.running == 1)
        shed = _chat(client, url)
        assert busy.result().status_code == 200
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "server_is_overloaded"
    assert engine.requests == 1 and _counted(counter, 2)


def test_a_request_no_engine_can_serve_counts(stack: ExitStack, client: httpx.Client) -> None:
    idle = FakeEngine()
    srv = stack.enter_context(ServerThread(idle))
    url, counter = _gateway(stack, [srv.url], healthy=False)  # none healthy: nothing listed
    answer = _chat(client, url)
    assert answer.status_code == 503 and idle.requests == 0
    assert _counted(counter, 1)


def test_refused_requests_do_not_count(
    start_engines: StartEngines, stack: ExitStack, client: httpx.Client
) -> None:
    ((engine, srv),) = start_engines(1)
    keys = [{"key": KEY}, {"key": LIMITED, "rpm": 1}]
    url, counter = _gateway(stack, [srv.url], api_keys=keys)
    assert _chat(client, url, LIMITED).status_code == 200
    refused = [
        _chat(client, url),  # no key: 401
        _chat(client, url, "k-unknown-01"),  # 401
        _chat(client, url, LIMITED),  # over its rate limit: 429
        _chat(client, url, KEY, model="not-served"),  # unknown model: 404
        _chat(client, url, KEY, max_tokens="many"),  # bad input: 400
        client.post(f"{url}/v1/chat/completions", content=b"{",
                    headers={"authorization": f"Bearer {KEY}"}),  # not JSON: 400
        _chat(client, url, KEY, headers={"x-switchyard-routing": "nope"}),  # unknown policy: 400
    ]  # fmt: skip
    assert [r.status_code for r in refused] == [401, 401, 429, 404, 400, 400, 400]
    assert engine.requests == 1 and _counted(counter, 1)


def test_over_its_limit_with_no_engine_is_refused_not_counted(
    stack: ExitStack, client: httpx.Client
) -> None:
    srv = stack.enter_context(ServerThread(FakeEngine()))
    url, counter = _gateway(stack, [srv.url], healthy=False, api_keys=[{"key": LIMITED, "rpm": 1}])
    assert _chat(client, url, LIMITED).status_code == 503  # demand: counted
    assert _chat(client, url, LIMITED).status_code == 429  # over its limit: the limit first
    assert _counted(counter, 1)


def test_nothing_is_counted_when_autoscaling_is_disabled(
    start_engines: StartEngines, stack: ExitStack, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    services = Services.build(gateway_settings([srv.url]))
    assert services.router.arrivals is None  # autoscaling disabled: no counter at all
    for state in services.endpoints:
        state.record_probe(True, fail_threshold=1, success_threshold=1)
    url = stack.enter_context(ServerThread(create_app(services.settings, services=services))).url
    assert _chat(client, url).status_code == 200
