"""The engine contract: the same tests against a real vLLM (CPU) and enginesim.

Every test takes the session-scoped ``engine`` fixture (parametrised ``vllm`` / ``enginesim``)
and compares what the engine does with what the real engine was recorded doing
(``recorded.py``). A test that passes on ``vllm`` and fails on ``enginesim`` is a simulator
bug to fix, never a reason to loosen the test. Assertions stay on structure, usage, status
codes, metric names/labels and stable messages: never on generated text (near-tie outputs).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from routing import WANTED_SERIES, parse_vllm_metrics
from tests.contract import recorded as rec
from tests.contract.conftest import ContractEngine
from tests.contract.helpers import (
    MetricsSnapshot,
    assert_error,
    scrape,
    stream_post,
    wait_for_metrics,
)

pytestmark = pytest.mark.real_engine

CHAT_HELLO = [{"role": "user", "content": "Hello"}]


def _model_cards(http: httpx.Client) -> dict[str, dict[str, Any]]:
    resp = http.get("/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    return {card["id"]: card for card in body["data"]}


def _long_prompt(tag: str, items: int = 100) -> str:
    """A prompt of several hundred tokens, unique per call so earlier tests cannot pre-cache it."""
    return f"[{tag}] " + " ".join(f"item {i}:" for i in range(items))


# --- health, models, tokenize -------------------------------------------------------------


def test_health_is_200_with_empty_body(http: httpx.Client) -> None:
    resp = http.get("/health")
    assert resp.status_code == 200
    assert resp.content == b""


def test_models_base_entry(http: httpx.Client, sdk: openai.OpenAI) -> None:
    cards = _model_cards(http)
    base = cards[rec.MODEL]
    assert set(base) == rec.MODEL_CARD_KEYS
    assert base["object"] == "model"
    assert base["owned_by"] == "vllm"
    assert base["parent"] is None
    assert isinstance(base["root"], str) and base["root"]
    assert base["max_model_len"] == rec.MAX_MODEL_LEN
    assert isinstance(base["created"], int)
    assert len(base["permission"]) == 1
    assert set(base["permission"][0]) == rec.PERMISSION_KEYS
    assert base["permission"][0]["object"] == "model_permission"
    # The openai SDK parses the same list.
    assert rec.MODEL in [m.id for m in sdk.models.list()]


def test_tokenize_prompt_shape(http: httpx.Client) -> None:
    body = http.post("/tokenize", json={"model": rec.MODEL, "prompt": "Hello world"}).json()
    assert set(body) == rec.TOKENIZE_KEYS
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == rec.MAX_MODEL_LEN
    assert body["token_strs"] is None
    assert all(isinstance(t, int) for t in body["tokens"])


def test_tokenize_uses_the_models_tokenizer_and_chat_template(http: httpx.Client) -> None:
    plain = http.post("/tokenize", json={"model": rec.MODEL, "prompt": "Hello world"}).json()
    assert tuple(plain["tokens"]) == rec.HELLO_WORLD_TOKENS
    chat = http.post(
        "/tokenize",
        json={"model": rec.MODEL, "messages": CHAT_HELLO, "add_generation_prompt": True},
    ).json()
    assert chat["count"] == rec.CHAT_HELLO_TOKENS
    detok = http.post("/detokenize", json={"model": rec.MODEL, "tokens": plain["tokens"]})
    assert detok.json() == {"prompt": "Hello world"}


# --- non-streaming ------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_completion_shape_and_exact_usage(http: httpx.Client, max_tokens: int) -> None:
    body = {
        "model": rec.MODEL,
        "prompt": rec.COUNTING_PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    out = resp.json()
    assert set(out) == rec.COMPLETION_KEYS
    assert out["object"] == "text_completion"
    assert re.fullmatch(r"cmpl-[0-9a-f]{16}", out["id"]), out["id"]
    assert out["system_fingerprint"].startswith("vllm-0.32.0-"), out["system_fingerprint"]
    assert out["model"] == rec.MODEL
    assert isinstance(out["created"], int)
    [choice] = out["choices"]
    assert set(choice) == rec.COMPLETION_CHOICE_KEYS
    assert choice["index"] == 0
    assert isinstance(choice["text"], str)
    assert choice["finish_reason"] == "length"
    usage = out["usage"]
    assert set(usage) == rec.USAGE_KEYS
    assert usage["completion_tokens"] == max_tokens
    assert usage["prompt_tokens"] == rec.COUNTING_PROMPT_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + max_tokens


def test_completion_prompt_tokens_match_tokenize(http: httpx.Client) -> None:
    prompt = _long_prompt(uuid.uuid4().hex, items=20)
    count = http.post("/tokenize", json={"model": rec.MODEL, "prompt": prompt}).json()["count"]
    out = http.post(
        "/v1/completions", json={"model": rec.MODEL, "prompt": prompt, "max_tokens": 1}
    ).json()
    assert out["usage"]["prompt_tokens"] == count


def test_chat_shape_and_usage(http: httpx.Client, sdk: openai.OpenAI) -> None:
    body = {"model": rec.MODEL, "messages": CHAT_HELLO, "max_tokens": 5, "ignore_eos": True}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert set(out) == rec.CHAT_KEYS
    assert out["object"] == "chat.completion"
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", out["id"]), out["id"]
    assert out["system_fingerprint"].startswith("vllm-0.32.0-"), out["system_fingerprint"]
    [choice] = out["choices"]
    assert set(choice) == rec.CHAT_CHOICE_KEYS
    assert set(choice["message"]) == rec.CHAT_MESSAGE_KEYS
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    assert set(out["usage"]) == rec.USAGE_KEYS
    assert out["usage"]["prompt_tokens"] == rec.CHAT_HELLO_TOKENS
    assert out["usage"]["completion_tokens"] == 5
    # Same request through the openai SDK.
    sdk_out = sdk.chat.completions.create(
        model=rec.MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert sdk_out.usage is not None and sdk_out.usage.completion_tokens == 5
    assert sdk_out.choices[0].message.role == "assistant"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_n2_returns_two_indexed_choices(http: httpx.Client, path: str) -> None:
    body: dict[str, Any] = {"model": rec.MODEL, "max_tokens": 3, "n": 2, "ignore_eos": True}
    if path == "/v1/completions":
        body["prompt"] = rec.COUNTING_PROMPT
    else:
        body["messages"] = CHAT_HELLO
    out = http.post(path, json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 6
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 6


# --- streaming ----------------------------------------------------------------------------


def test_stream_completion_with_usage(http: httpx.Client) -> None:
    body = {
        "model": rec.MODEL,
        "prompt": rec.COUNTING_PROMPT,
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sse = stream_post(http, "/v1/completions", body)
    assert sse.content_type.startswith("text/event-stream")
    assert sse.done and sse.events_after_done == 0
    *content, usage_chunk = sse.chunks
    assert len({c["id"] for c in sse.chunks}) == 1
    assert sse.chunks[0]["id"].startswith("cmpl-")
    assert len(content) == 4  # one chunk per token
    for i, chunk in enumerate(content):
        assert set(chunk) == rec.STREAM_COMPLETION_CHUNK_KEYS
        assert chunk["object"] == "text_completion"
        [choice] = chunk["choices"]
        assert set(choice) == rec.STREAM_COMPLETION_CHOICE_KEYS
        assert choice["finish_reason"] == ("length" if i == 3 else None)
    assert set(usage_chunk) == rec.STREAM_USAGE_CHUNK_KEYS
    assert usage_chunk["choices"] == []
    assert set(usage_chunk["usage"]) == rec.STREAM_USAGE_KEYS
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens"] == rec.COUNTING_PROMPT_TOKENS


def test_stream_chat_with_usage(http: httpx.Client) -> None:
    body = {
        "model": rec.MODEL,
        "messages": CHAT_HELLO,
        "max_tokens": 3,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sse = stream_post(http, "/v1/chat/completions", body)
    assert sse.done and sse.events_after_done == 0
    first, *content, usage_chunk = sse.chunks
    assert set(first) == rec.STREAM_CHAT_FIRST_CHUNK_KEYS
    assert first["object"] == "chat.completion.chunk"
    assert first["id"].startswith("chatcmpl-")
    [choice] = first["choices"]
    assert set(choice) == rec.STREAM_CHAT_FIRST_CHOICE_KEYS
    assert choice["delta"] == {"role": "assistant", "content": ""}
    assert len(content) == 3
    for i, chunk in enumerate(content):
        assert set(chunk) == rec.STREAM_CHAT_CHUNK_KEYS
        [choice] = chunk["choices"]
        last = i == 2
        expected = rec.STREAM_CHAT_CHOICE_KEYS | ({"stop_reason"} if last else set())
        assert set(choice) == expected
        assert set(choice["delta"]) == {"content"}
        assert choice["finish_reason"] == ("length" if last else None)
    assert set(usage_chunk) == rec.STREAM_USAGE_CHUNK_KEYS
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["prompt_tokens"] == rec.CHAT_HELLO_TOKENS
    assert len({c["id"] for c in sse.chunks}) == 1


def test_stream_n2_without_usage(http: httpx.Client) -> None:
    body = {
        "model": rec.MODEL,
        "messages": CHAT_HELLO,
        "max_tokens": 2,
        "n": 2,
        "ignore_eos": True,
        "stream": True,
    }
    sse = stream_post(http, "/v1/chat/completions", body)
    assert sse.done
    assert all("usage" not in c for c in sse.chunks)
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in sse.chunks:
        [choice] = chunk["choices"]
        by_index[choice["index"]].append(chunk)
    for chunks in by_index.values():
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert len(chunks) == 3  # role delta + one chunk per token
        finals = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
        assert finals == [chunks[-1]]
        # Without include_usage the final chunk of each choice carries system_fingerprint.
        assert "system_fingerprint" in chunks[-1]


def test_stream_via_openai_sdk(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=rec.MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_404_not_found(http: httpx.Client, path: str) -> None:
    body: dict[str, Any] = {"model": "nope", "max_tokens": 3}
    body |= {"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT_HELLO}
    assert_error(
        http.post(path, json=body),
        status=404,
        type_="NotFoundError",
        param="model",
        message=rec.UNKNOWN_MODEL_MESSAGE.format(name="nope"),
    )


def test_unknown_model_via_sdk_raises_not_found(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="nope", prompt="Hi", max_tokens=1)
    assert info.value.status_code == 404


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_json_is_400(http: httpx.Client, path: str) -> None:
    resp = http.post(path, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(
        resp, status=400, type_="Bad Request", param="body.1", fragment="'type': 'json_invalid'"
    )


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        (
            "/v1/completions",
            {"model": rec.MODEL, "prompt": "Hi", "max_tokens": "ten"},
            "body.max_tokens",
            "'type': 'int_parsing'",
        ),
        (
            "/v1/chat/completions",
            {"model": rec.MODEL, "messages": "hi"},
            "body.messages",
            "'type': 'list_type'",
        ),
    ],
    ids=["max_tokens-string", "messages-string"],
)
def test_wrong_types_are_400(
    http: httpx.Client, path: str, body: dict[str, Any], param: str, fragment: str
) -> None:
    resp = http.post(path, json=body)
    assert_error(resp, status=400, type_="Bad Request", param=param, fragment=fragment)
    assert resp.json()["error"]["message"].startswith("1 validation error:")


def test_missing_prompt_is_400(http: httpx.Client) -> None:
    assert_error(
        http.post("/v1/completions", json={"model": rec.MODEL}),
        status=400,
        type_="BadRequestError",
        param="prompt",
        message=rec.MISSING_PROMPT_MESSAGE,
    )


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_context_overflow_is_400(http: httpx.Client, path: str) -> None:
    text = "hello " * 2100
    body: dict[str, Any] = {"model": rec.MODEL, "max_tokens": 5}
    body |= (
        {"prompt": text}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": text}]}
    )
    assert_error(
        http.post(path, json=body),
        status=400,
        type_="BadRequestError",
        param="input_tokens",
        message=rec.OVERFLOW_PROMPT_MESSAGE,
    )


def test_max_tokens_over_context_is_400(http: httpx.Client) -> None:
    body = {"model": rec.MODEL, "prompt": "hello", "max_tokens": 5000}
    assert_error(
        http.post("/v1/completions", json=body),
        status=400,
        type_="BadRequestError",
        param="max_tokens",
        message=rec.OVERFLOW_MAX_TOKENS_MESSAGE,
    )


def test_unknown_route_and_method(http: httpx.Client) -> None:
    resp = http.get("/nope")
    assert (resp.status_code, resp.json()) == (404, {"detail": "Not Found"})
    resp = http.get("/v1/completions")
    assert (resp.status_code, resp.json()) == (405, {"detail": "Method Not Allowed"})


# --- LoRA ---------------------------------------------------------------------------------


def test_lora_load_use_unload(engine: ContractEngine, http: httpx.Client) -> None:
    name = f"rand{uuid.uuid4().hex[:6]}"
    load = {"lora_name": name, "lora_path": engine.lora_path}

    bad = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "/nonexistent"})
    assert_error(
        bad,
        status=404,
        type_="NotFoundError",
        param=None,
        message=rec.LORA_BAD_PATH_MESSAGE.format(name=name, path="/nonexistent"),
    )
    missing = http.post("/v1/load_lora_adapter", json={"lora_name": name})
    assert_error(
        missing,
        status=400,
        type_="Bad Request",
        param="body.lora_path",
        fragment="'type': 'missing'",
    )

    ok = http.post("/v1/load_lora_adapter", json=load)
    assert (ok.status_code, ok.text) == (200, rec.LORA_LOADED_TEXT.format(name=name))
    dup = http.post("/v1/load_lora_adapter", json=load)
    assert_error(
        dup,
        status=400,
        type_="InvalidUserInput",
        param=None,
        message=rec.LORA_DUPLICATE_MESSAGE.format(name=name),
    )

    cards = _model_cards(http)
    adapter = cards[name]
    assert set(adapter) == rec.MODEL_CARD_KEYS
    assert adapter["parent"] == rec.MODEL
    assert adapter["root"] == engine.lora_path
    assert adapter["max_model_len"] is None
    assert cards[rec.MODEL]["parent"] is None

    for path, extra in (
        ("/v1/completions", {"prompt": rec.COUNTING_PROMPT}),
        ("/v1/chat/completions", {"messages": CHAT_HELLO}),
    ):
        body = {"model": name, "max_tokens": 3, "ignore_eos": True, **extra}
        out = http.post(path, json=body)
        assert out.status_code == 200, out.text
        assert out.json()["model"] == name
        assert out.json()["usage"]["completion_tokens"] == 3

    snap = scrape(http)
    lora_type, lora_samples = snap.families["vllm:lora_requests_info"]
    assert lora_type == "gauge"
    assert {s.labels["max_lora"] for s in lora_samples} == {"2"}
    seen = {
        a
        for s in lora_samples
        for key in ("running_lora_adapters", "waiting_lora_adapters")
        for a in s.labels[key].split(",")
    }
    assert name in seen

    unload = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert (unload.status_code, unload.text) == (200, rec.LORA_UNLOADED_TEXT.format(name=name))
    assert name not in _model_cards(http)
    assert_error(
        http.post("/v1/unload_lora_adapter", json={"lora_name": name}),
        status=404,
        type_="NotFoundError",
        param=None,
        message=rec.LORA_UNKNOWN_MESSAGE.format(name=name),
    )
    assert_error(
        http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 3}),
        status=404,
        type_="NotFoundError",
        param="model",
        message=rec.UNKNOWN_MODEL_MESSAGE.format(name=name),
    )


def test_unload_unknown_adapter_is_404(http: httpx.Client) -> None:
    assert_error(
        http.post("/v1/unload_lora_adapter", json={"lora_name": "ghost"}),
        status=404,
        type_="NotFoundError",
        param=None,
        message=rec.LORA_UNKNOWN_MESSAGE.format(name="ghost"),
    )


# --- metrics ------------------------------------------------------------------------------


def test_metrics_we_rely_on_exist_with_same_types_and_labels(http: httpx.Client) -> None:
    # One request first so every histogram has observations on both engines.
    http.post("/v1/completions", json={"model": rec.MODEL, "prompt": "Hi", "max_tokens": 2})
    resp = http.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    snap = scrape(http)
    problems: list[str] = []
    for name, (mtype, labels) in rec.RELIED_METRICS.items():
        if name not in snap.families:
            problems.append(f"missing {name}")
            continue
        got_type, samples = snap.families[name]
        if got_type != mtype:
            problems.append(f"{name}: type {got_type} != {mtype}")
        if not samples:
            problems.append(f"{name}: no samples")
        if name == "vllm:cache_config_info":
            continue
        for s in samples:
            got = set(s.labels) - {"le"}
            if got != labels:
                problems.append(f"{name}: labels {sorted(got)} != {sorted(labels)}")
                break
            if "model_name" in labels and s.labels["model_name"] != rec.MODEL:
                problems.append(f"{name}: model_name={s.labels['model_name']}")
                break
    assert not problems, "\n".join(problems)


def test_metrics_histogram_buckets_and_series(http: httpx.Client) -> None:
    http.post("/v1/completions", json={"model": rec.MODEL, "prompt": "Hi", "max_tokens": 2})
    snap = scrape(http)
    for name, buckets in rec.HISTOGRAM_BUCKETS.items():
        _type, samples = snap.families[name]
        les = tuple(float(s.labels["le"]) for s in samples if s.name == name + "_bucket")
        assert les == buckets, name
        suffixes = {s.name[len(name) :] for s in samples}
        assert suffixes == {"_bucket", "_sum", "_count"}, name
    _type, success = snap.families["vllm:request_success"]
    assert {s.labels["finished_reason"] for s in success} == rec.FINISHED_REASONS
    assert {s.name for s in success} == {"vllm:request_success_total"}


def test_metrics_cache_config_info(http: httpx.Client) -> None:
    _type, samples = scrape(http).families["vllm:cache_config_info"]
    [info] = samples
    assert info.value == 1.0
    for key, value in rec.CACHE_CONFIG_LABELS.items():
        assert info.labels.get(key) == value, key
    assert rec.CACHE_CONFIG_LABELS_PRESENT <= set(info.labels)
    assert int(info.labels["num_gpu_blocks"]) > 0


def test_metrics_name_filter_restricts_the_page(http: httpx.Client) -> None:
    # The gateway's scraper asks /metrics/ for routing.WANTED_SERIES only (prometheus_client's
    # name[] filter) and for no gzip; that page must hold exactly those samples and parse the
    # same as the whole page. /metrics itself ignores the filter (vLLM 0.32: 52 KB vs 4 KB).
    http.post("/v1/completions", json={"model": rec.MODEL, "prompt": "Hi", "max_tokens": 2})
    full = scrape(http)
    asked = [("name[]", n) for n in WANTED_SERIES]
    resp = http.get("/metrics/", params=asked, headers={"accept-encoding": "identity"})
    assert resp.status_code == 200 and "content-encoding" not in resp.headers
    assert resp.headers["content-type"].startswith("text/plain")
    part = {s.name for f in text_string_to_metric_families(resp.text) for s in f.samples}
    whole = {s.name for _type, samples in full.families.values() for s in samples}
    assert part == whole & set(WANTED_SERIES)
    unfiltered = http.get("/metrics", params=asked)
    assert {
        s.name for f in text_string_to_metric_families(unfiltered.text) for s in f.samples
    } == whole
    assert parse_vllm_metrics(resp.text) == parse_vllm_metrics(unfiltered.text)


def _counter(snap: MetricsSnapshot, name: str) -> float:
    return snap.value(name, model_name=rec.MODEL)


def _reached(name: str, target: float) -> Callable[[MetricsSnapshot], bool]:
    return lambda snap: _counter(snap, name) >= target


def test_prefix_cache_hits_on_repeated_long_prompt(http: httpx.Client) -> None:
    prompt = _long_prompt(uuid.uuid4().hex)
    names = (
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_cached_total",
        "vllm:prompt_tokens_total",
    )
    deltas: list[dict[str, float]] = []
    prompt_tokens = 0
    for _ in range(2):
        before = scrape(http)
        out = http.post(
            "/v1/completions", json={"model": rec.MODEL, "prompt": prompt, "max_tokens": 1}
        ).json()
        prompt_tokens = out["usage"]["prompt_tokens"]
        base = {n: _counter(before, n) for n in names}
        after = wait_for_metrics(http, _reached(names[3], base[names[3]] + prompt_tokens))
        deltas.append({n: _counter(after, n) - base[n] for n in names})
    assert prompt_tokens > 3 * rec.BLOCK_SIZE
    # Only full 128-token blocks are cached, and the last prompt token is always recomputed.
    expected_hits = (prompt_tokens - 1) // rec.BLOCK_SIZE * rec.BLOCK_SIZE
    first, second = deltas
    assert first == {names[0]: prompt_tokens, names[1]: 0, names[2]: 0, names[3]: prompt_tokens}
    assert second == {
        names[0]: prompt_tokens,
        names[1]: expected_hits,
        names[2]: expected_hits,
        names[3]: prompt_tokens,
    }
    assert second[names[1]] >= 128


# --- semantics the gateway and the routing scorers read -------------------------------------


def _token_prompt(n: int, seed: int) -> list[int]:
    """``n`` random token ids (exact prompt length, unique per seed)."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "expected_completion"),
    [(2000, 100, 48), (2047, 5, 1), (10, None, rec.DEFAULT_COMPLETION_MAX_TOKENS)],
    ids=["clamped-to-context", "one-token-left", "default-16"],
)
def test_max_tokens_is_clamped_to_the_context(
    http: httpx.Client, prompt_len: int, max_tokens: int | None, expected_completion: int
) -> None:
    # vLLM 0.32 does not reject prompt + max_tokens > max_model_len: it generates up to the end
    # of the context and reports finish_reason "length".
    body: dict[str, Any] = {
        "model": rec.MODEL,
        "prompt": _token_prompt(prompt_len, seed=prompt_len),
        "ignore_eos": True,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["usage"]["prompt_tokens"] == prompt_len
    assert out["usage"]["completion_tokens"] == expected_completion
    assert out["choices"][0]["finish_reason"] == "length"


def test_prompt_filling_the_context_is_400(http: httpx.Client) -> None:
    body = {"model": rec.MODEL, "prompt": _token_prompt(rec.MAX_MODEL_LEN, seed=1), "max_tokens": 5}
    assert_error(
        http.post("/v1/completions", json=body),
        status=400,
        type_="BadRequestError",
        param="max_tokens",
        message="max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
    )


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    rec.VALIDATION_ERRORS,
    ids=["max_tokens-0", "max_tokens-negative", "n-0", "temperature-negative"],
)
def test_sampling_validation_is_400(
    http: httpx.Client, extra: dict[str, Any], param: str | None, message: str
) -> None:
    body = {"model": rec.MODEL, "prompt": "Hi", "max_tokens": 2, **extra}
    assert_error(
        http.post("/v1/completions", json=body),
        status=400,
        type_="BadRequestError",
        param=param,
        message=message,
    )


def test_empty_messages_is_400(http: httpx.Client) -> None:
    assert_error(
        http.post(
            "/v1/chat/completions", json={"model": rec.MODEL, "messages": [], "max_tokens": 2}
        ),
        status=400,
        type_="BadRequestError",
        param=None,
        message=rec.EMPTY_MESSAGES_MESSAGE,
    )


def test_missing_model_uses_the_served_model(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == rec.MODEL


def test_prompt_list_gives_one_choice_per_prompt(http: httpx.Client) -> None:
    prompts = [_token_prompt(3, seed=3), _token_prompt(5, seed=5)]
    body = {"model": rec.MODEL, "prompt": prompts, "max_tokens": 2, "ignore_eos": True}
    out = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == 8
    assert out["usage"]["completion_tokens"] == 4


def test_max_completion_tokens_limits_chat(http: httpx.Client) -> None:
    body = {
        "model": rec.MODEL,
        "messages": CHAT_HELLO,
        "max_completion_tokens": 3,
        "ignore_eos": True,
    }
    out = http.post("/v1/chat/completions", json=body).json()
    assert out["usage"]["completion_tokens"] == 3


def _moved(before: MetricsSnapshot, after: MetricsSnapshot) -> dict[str, float]:
    """Which per-model samples changed, by sample name plus the non-standard labels."""
    names = {
        "vllm:prompt_tokens_total": {},
        "vllm:generation_tokens_total": {},
        "vllm:prefix_cache_queries_total": {},
        "vllm:request_success_total": {"finished_reason": "length"},
        "vllm:time_to_first_token_seconds_count": {},
        "vllm:inter_token_latency_seconds_count": {},
        "vllm:e2e_request_latency_seconds_count": {},
        "vllm:request_prompt_tokens_sum": {},
        "vllm:request_generation_tokens_sum": {},
        "vllm:request_params_n_sum": {},
    }
    return {
        name: after.value(name, model_name=rec.MODEL, **labels)
        - before.value(name, model_name=rec.MODEL, **labels)
        for name, labels in names.items()
    }


@pytest.mark.parametrize("n", [1, 2])
def test_metrics_move_with_one_request(http: httpx.Client, n: int) -> None:
    before = scrape(http)
    body = {
        "model": rec.MODEL,
        "prompt": _token_prompt(14, seed=100 + n),
        "max_tokens": 5,
        "ignore_eos": True,
        "n": n,
    }
    out = http.post("/v1/completions", json=body).json()
    assert out["usage"] == {
        "prompt_tokens": 14,
        "completion_tokens": 5 * n,
        "total_tokens": 14 + 5 * n,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    target = before.value("vllm:generation_tokens_total", model_name=rec.MODEL) + 5 * n
    after = wait_for_metrics(http, _reached("vllm:generation_tokens_total", target))
    # With n > 1 vLLM counts every child request: the prompt is counted n times.
    assert _moved(before, after) == {
        "vllm:prompt_tokens_total": 14 * n,
        "vllm:generation_tokens_total": 5 * n,
        "vllm:prefix_cache_queries_total": 14 * n,
        "vllm:request_success_total": n,
        "vllm:time_to_first_token_seconds_count": n,
        "vllm:inter_token_latency_seconds_count": 4 * n,
        "vllm:e2e_request_latency_seconds_count": n,
        "vllm:request_prompt_tokens_sum": 14 * n,
        "vllm:request_generation_tokens_sum": 5 * n,
        "vllm:request_params_n_sum": n,
    }


def test_running_gauge_and_kv_usage_follow_a_stream(http: httpx.Client) -> None:
    body = {
        "model": rec.MODEL,
        "prompt": _token_prompt(200, seed=7),
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    with http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert first.startswith("data: {")
        during = scrape(http)
        for _ in lines:
            pass
    after = wait_for_metrics(
        http, lambda s: s.value("vllm:num_requests_running", model_name=rec.MODEL) == 0
    )
    assert during.value("vllm:num_requests_running", model_name=rec.MODEL) == 1
    assert during.value("vllm:num_requests_waiting", model_name=rec.MODEL) == 0
    assert 0 < during.value("vllm:kv_cache_usage_perc", model_name=rec.MODEL) < 1
    assert after.value("vllm:num_requests_running", model_name=rec.MODEL) == 0
    assert after.value("vllm:kv_cache_usage_perc", model_name=rec.MODEL) == 0


def _hits(http: httpx.Client, body: dict[str, Any]) -> float:
    before = scrape(http)
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    prompt_tokens = resp.json()["usage"]["prompt_tokens"]
    target = before.value("vllm:prompt_tokens_total", model_name=rec.MODEL) + prompt_tokens
    after = wait_for_metrics(http, _reached("vllm:prompt_tokens_total", target))
    return after.value("vllm:prefix_cache_hits_total", model_name=rec.MODEL) - before.value(
        "vllm:prefix_cache_hits_total", model_name=rec.MODEL
    )


def test_cache_salt_isolates_the_prefix_cache(http: httpx.Client) -> None:
    prompt = _token_prompt(521, seed=uuid.uuid4().int)
    base = {"model": rec.MODEL, "prompt": prompt, "max_tokens": 1}
    assert _hits(http, {**base, "cache_salt": "A"}) == 0
    assert _hits(http, {**base, "cache_salt": "A"}) == 512
    assert _hits(http, {**base, "cache_salt": "B"}) == 0
    assert _hits(http, base) == 0
    assert _hits(http, base) == 512


def test_lora_prefix_cache_is_per_adapter(engine: ContractEngine, http: httpx.Client) -> None:
    name = f"pc{uuid.uuid4().hex[:6]}"
    load = http.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": engine.lora_path}
    )
    assert load.status_code == 200, load.text
    try:
        prompt = _token_prompt(521, seed=uuid.uuid4().int)
        assert _hits(http, {"model": rec.MODEL, "prompt": prompt, "max_tokens": 1}) == 0
        # The adapter name is part of the block hash: the base model's blocks do not match.
        assert _hits(http, {"model": name, "prompt": prompt, "max_tokens": 1}) == 0
        assert _hits(http, {"model": name, "prompt": prompt, "max_tokens": 1}) == 512
    finally:
        http.post("/v1/unload_lora_adapter", json={"lora_name": name})
