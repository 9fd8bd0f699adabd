"""The LoRA slot contract, on a real vLLM (CPU) and enginesim alike (see test_contract.py).

Both engines run with ``max_loras`` 2 and ``max_cpu_loras`` 2 (vLLM's default: equal to
``max_loras``). What placement and on-demand loading rely on:

* loading more adapters than ``max_cpu_loras`` succeeds: the API keeps every one (listed in
  ``/v1/models``, each serves); vLLM evicts the least recently used from its CPU cache and
  re-reads it from disk when next used, so the cap costs latency, never availability;
* requests for more distinct adapters than ``max_loras`` wait (``num_requests_waiting``)
  until a request of another adapter finishes or is aborted (its client leaves), then run.
  ``vllm:lora_requests_info`` lists the same adapters under its running and waiting labels
  -- those with a request in flight that was scheduled at least once -- so an adapter whose
  requests all wait for a slot is not listed at all (vLLM 0.32 learns request states from
  the events on their outputs): the gateway must count what it sent, not read demand for
  slots from this metric;
* unloading an adapter never fails the requests already running or queued for it: they
  finish; new requests for it get 404 at once, and it can be loaded again.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from routing import parse_vllm_metrics
from tests.contract import recorded as rec
from tests.contract.conftest import ContractEngine
from tests.contract.helpers import MetricsSnapshot, assert_error, wait_for_metrics

pytestmark = pytest.mark.real_engine

MAX_LORAS = 2
WAIT_S = 120.0
HOLD_TOKENS = 1500  # prompt + 1500 < max_model_len 2048; minutes of decoding on CPU


def _models(http: httpx.Client) -> dict[str, dict[str, Any]]:
    resp = http.get("/v1/models")
    assert resp.status_code == 200
    return {card["id"]: card for card in resp.json()["data"]}


def _unload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


@contextmanager
def _adapters(engine: ContractEngine, http: httpx.Client, n: int) -> Iterator[list[str]]:
    """``n`` freshly named adapters (same weights) loaded in order; unloaded afterwards."""
    names = [f"slot{i}{uuid.uuid4().hex[:6]}" for i in range(n)]
    try:
        for name in names:
            load = {"lora_name": name, "lora_path": engine.lora_path}
            resp = http.post("/v1/load_lora_adapter", json=load)
            assert (resp.status_code, resp.text) == (200, rec.LORA_LOADED_TEXT.format(name=name))
        yield names
    finally:
        for name in names:
            _unload(http, name)


def _complete(http: httpx.Client, model: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": rec.COUNTING_PROMPT, "max_tokens": max_tokens,
            "ignore_eos": True}  # fmt: skip
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def _stream(
    engine: ContractEngine,
    model: str,
    max_tokens: int,
    started: threading.Event | None = None,
    leave: threading.Event | None = None,
) -> tuple[int, str | None]:
    """Stream a completion; sets ``started`` at the first token. Returns the completion tokens
    (usage) and the last finish reason -- or, once ``leave`` is set, closes the connection
    after the next chunk (the engine aborts the request) and returns the chunks seen, None."""
    body = {"model": model, "prompt": rec.COUNTING_PROMPT, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    tokens, reason, chunks = -1, None, 0
    with engine.client() as client, client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if leave is not None and leave.is_set():
                return chunks, None
            chunks += 1
            chunk = json.loads(line[len("data: ") :])
            for choice in chunk.get("choices") or ():
                if started is not None:
                    started.set()
                reason = choice.get("finish_reason") or reason
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, reason


def _lora_labels(snap: MetricsSnapshot) -> tuple[set[str], set[str]]:
    """Running and waiting adapters of the newest ``vllm:lora_requests_info`` series."""
    _, samples = snap.families["vllm:lora_requests_info"]
    newest = max(samples, key=lambda s: s.value)
    return tuple(  # type: ignore[return-value]
        {a for a in newest.labels[key].split(",") if a}
        for key in ("running_lora_adapters", "waiting_lora_adapters")
    )


def _requests(snap: MetricsSnapshot, kind: str) -> float:
    return snap.value(f"vllm:num_requests_{kind}", model_name=rec.MODEL)


def test_more_adapters_than_max_cpu_loras_all_load_and_serve(
    engine: ContractEngine, http: httpx.Client
) -> None:
    with _adapters(engine, http, MAX_LORAS + 1) as names:
        cards = _models(http)
        assert all(cards[name]["parent"] == rec.MODEL for name in names)
        # In load order: on vLLM the first was evicted from the CPU cache by the third load.
        for name in names:
            out = _complete(http, name, 3)
            assert (out["model"], out["usage"]["completion_tokens"]) == (name, 3)
        for name in names:  # evicted from the CPU cache or not, each unloads
            resp = _unload(http, name)
            assert (resp.status_code, resp.text) == (200, rec.LORA_UNLOADED_TEXT.format(name=name))
        assert not set(names) & set(_models(http))


def test_more_distinct_adapters_than_max_loras_wait_for_a_slot(
    engine: ContractEngine, http: httpx.Client
) -> None:
    # a and b hold both slots until the test lets them go (HOLD_TOKENS is far more than the
    # test needs; a natural end of either before c queued would make the check race the
    # engine's speed), then a leaves: the engine aborts it and c takes its slot.
    with _adapters(engine, http, MAX_LORAS + 1) as (a, b, c), ThreadPoolExecutor(3) as pool:
        running = [threading.Event(), threading.Event()]
        leave = [threading.Event(), threading.Event()]
        first = [
            pool.submit(_stream, engine, name, HOLD_TOKENS, ev, stop)
            for name, ev, stop in zip((a, b), running, leave, strict=True)
        ]
        try:
            assert all(ev.wait(WAIT_S) for ev in running)
            both = wait_for_metrics(http, lambda s: _requests(s, "running") >= 2)
            assert (_requests(both, "running"), _requests(both, "waiting")) == (2, 0)
            late = pool.submit(_stream, engine, c, 4)
            during = wait_for_metrics(http, lambda s: _requests(s, "waiting") >= 1)
            # c waits: its adapter would be a third in a batch of at most max_loras adapters.
            assert (_requests(during, "running"), _requests(during, "waiting")) == (2, 1)
            assert _lora_labels(during) == ({a, b}, {a, b})  # c, never scheduled, is not listed
            parsed = parse_vllm_metrics(http.get("/metrics").text)
            assert parsed.max_lora == MAX_LORAS
            assert parsed.running_adapters == parsed.waiting_adapters == {a, b}
            # Unloading a waiting request's adapter does not fail it: it runs once a slot frees.
            resp = _unload(http, c)
            assert (resp.status_code, resp.text) == (200, rec.LORA_UNLOADED_TEXT.format(name=c))
            assert not late.done()
            leave[0].set()  # a's client leaves: its slot frees
            assert late.result(timeout=WAIT_S) == (4, "length")
            assert not first[1].done()  # b still holds its slot
        finally:
            for stop in leave:
                stop.set()
        held = [f.result(timeout=WAIT_S) for f in first]
    assert all(reason is None and 0 < chunks < HOLD_TOKENS for chunks, reason in held), held
    after = wait_for_metrics(http, lambda s: _requests(s, "running") + _requests(s, "waiting") == 0)
    assert (_requests(after, "running"), _requests(after, "waiting")) == (0, 0)
    assert _lora_labels(after) == (set(), set())


def test_unload_with_a_request_running_lets_it_finish(
    engine: ContractEngine, http: httpx.Client
) -> None:
    with _adapters(engine, http, 1) as (name,), ThreadPoolExecutor(1) as pool:
        started = threading.Event()
        stream = pool.submit(_stream, engine, name, 64, started)
        assert started.wait(WAIT_S)
        resp = _unload(http, name)
        assert (resp.status_code, resp.text) == (200, rec.LORA_UNLOADED_TEXT.format(name=name))
        assert name not in _models(http)
        assert_error(
            http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 3}),
            status=404,
            type_="NotFoundError",
            param="model",
            message=rec.UNKNOWN_MODEL_MESSAGE.format(name=name),
        )
        assert stream.result(timeout=WAIT_S) == (64, "length")
        # The name is free again: load it anew, and it serves.
        load = {"lora_name": name, "lora_path": engine.lora_path}
        again = http.post("/v1/load_lora_adapter", json=load)
        assert (again.status_code, again.text) == (200, rec.LORA_LOADED_TEXT.format(name=name))
        assert _complete(http, name, 2)["usage"]["completion_tokens"] == 2
