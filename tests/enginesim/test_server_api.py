"""The simulated engine's OpenAI/vLLM HTTP API against a real cluster on loopback ports.

Clients: the real ``openai`` SDK for the OpenAI routes, httpx for the vLLM extras.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from enginesim.cluster import RunningEngine
from tests.enginesim.server_harness import MODEL

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine_seed() -> int:
    return 7


@pytest.fixture
def sdk(engine: RunningEngine) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=engine.url + "/v1", api_key="x", max_retries=0, timeout=30.0)
    try:
        yield client
    finally:
        client.close()


def _sse(raw: str) -> tuple[list[dict[str, Any]], bool]:
    chunks, done = [], False
    for event in raw.split("\n\n"):
        if not event.strip():
            continue
        assert event.startswith("data: ")
        payload = event[len("data: ") :]
        if payload == "[DONE]":
            done = True
        else:
            chunks.append(json.loads(payload))
    return chunks, done


def test_health_models_and_version(http: httpx.Client, sdk: openai.OpenAI) -> None:
    health = http.get("/health")
    assert (health.status_code, health.content) == (200, b"")
    assert [m.id for m in sdk.models.list()] == [MODEL]
    [card] = http.get("/v1/models").json()["data"]
    assert (card["parent"], card["owned_by"], card["max_model_len"]) == (None, "vllm", 2048)


def test_chat_non_streaming_exact_usage(sdk: openai.OpenAI, http: httpx.Client) -> None:
    out = sdk.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert out.id.startswith("chatcmpl-")
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.role == "assistant"
    assert out.usage is not None and out.usage.completion_tokens == 5
    count = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()["count"]
    assert out.usage.prompt_tokens == count


def test_chat_streaming_with_usage_via_sdk(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.role is None]
    assert len(content) == 4  # one chunk per token
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1


def test_completion_streaming_raw_sse(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "1, 2, 3", "max_tokens": 3, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks, done = _sse(resp.read().decode())
    assert done
    *content, usage = chunks
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, "length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_streaming_without_usage_has_no_usage_chunk(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        chunks, done = _sse(resp.read().decode())
    assert done and len(chunks) == 2 and all(c["choices"] for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_n2_choices(sdk: openai.OpenAI, stream: bool) -> None:
    if not stream:
        out = sdk.completions.create(
            model=MODEL, prompt="count", max_tokens=3, n=2, extra_body={"ignore_eos": True}
        )
        assert sorted(c.index for c in out.choices) == [0, 1]
        assert out.usage is not None and out.usage.completion_tokens == 6
        return
    chunks = list(
        sdk.completions.create(
            model=MODEL,
            prompt="count",
            max_tokens=3,
            n=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    )
    per_index = {0: 0, 1: 0}
    for c in chunks:
        per_index[c.choices[0].index] += 1
    assert per_index == {0: 3, 1: 3}


def test_ignore_eos_exact_counts(sdk: openai.OpenAI) -> None:
    for n in (1, 7, 16):
        out = sdk.completions.create(
            model=MODEL, prompt="x y z", max_tokens=n, extra_body={"ignore_eos": True}
        )
        assert out.usage is not None and out.usage.completion_tokens == n
        assert out.choices[0].finish_reason == "length"


def test_completions_default_max_tokens_is_16(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(model=MODEL, prompt="x", extra_body={"ignore_eos": True})
    assert out.usage is not None and out.usage.completion_tokens == 16


def test_stop_string_truncates_and_finishes_with_stop(http: httpx.Client) -> None:
    base = {"model": MODEL, "prompt": "tell me", "max_tokens": 40, "ignore_eos": True,
            "request_id": "stop-replay"}  # fmt: skip
    full = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(full) >= 12
    stop = full[8:11]
    cut = full.index(stop)
    out = http.post("/v1/completions", json=base | {"stop": [stop]}).json()
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == full[:cut]
    assert out["usage"]["completion_tokens"] < 40
    kept = http.post(
        "/v1/completions", json=base | {"stop": stop, "include_stop_str_in_output": True}
    ).json()
    assert kept["choices"][0]["text"] == full[: cut + len(stop)]
    # Streaming gives the same text, never leaking the stop string.
    with http.stream("POST", "/v1/completions", json=base | {"stop": [stop], "stream": True}) as r:
        chunks, done = _sse(r.read().decode())
    assert done
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_unknown_fields_and_user_are_ignored(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "user": "u1", "guided_json": {},
            "frobnicate": [1, 2], "temperature": 0.3}  # fmt: skip
    assert http.post("/v1/completions", json=body).status_code == 200


def test_token_id_prompts_and_batches(http: httpx.Client) -> None:
    out = http.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": [[20, 21, 22], [30, 31]],
            "max_tokens": 2,
            "n": 2,
            "ignore_eos": True,
        },  # fmt: skip
    ).json()
    assert sorted(c["index"] for c in out["choices"]) == [0, 1, 2, 3]
    assert out["usage"]["prompt_tokens"] == 5
    assert out["usage"]["completion_tokens"] == 8


def test_tokenize_detokenize_and_render(http: httpx.Client) -> None:
    tok = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert set(tok) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tok["count"] == len(tok["tokens"]) > 0
    detok = http.post("/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()
    assert set(detok) == {"prompt"} and isinstance(detok["prompt"], str) and detok["prompt"]
    chat = http.post("/v1/chat/completions/render", json={"model": MODEL, "messages": CHAT}).json()
    counted = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    assert chat["token_ids"] == counted["tokens"] and chat["model"] == MODEL
    comp = http.post("/v1/completions/render", json={"model": MODEL, "prompt": ["a", "b"]}).json()
    assert isinstance(comp, list) and len(comp) == 2 and comp[0]["token_ids"]


def test_load_endpoints_and_peer_probes(http: httpx.Client) -> None:
    assert http.get("/get_load").json() == {"load": 0}
    assert http.get("/load").json() == {"server_load": 0}
    for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
        body = http.get(path).json()
        assert body["model_path"] == MODEL, path
    assert http.get("/server_info").json()["page_size"] == 128


def test_unknown_model_is_404(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="nope", prompt="hi", max_tokens=1)
    err = info.value.body
    assert isinstance(err, dict)
    assert err["message"] == "The model `nope` does not exist. Valid aliases: smollm2."
    assert (err["type"], err["param"], err["code"]) == ("NotFoundError", "model", 404)


def test_context_overflow_is_400(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": list(range(20, 2200))})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "BadRequestError" and err["param"] == "input_tokens"
    assert err["message"].startswith("This model's maximum context length is 2048 tokens.")
    too_many = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 9999}
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"


def test_max_tokens_is_clamped_to_the_room_left(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": list(range(20, 2040)), "max_tokens": 100, "ignore_eos": True}
    out = http.post("/v1/completions", json=body).json()
    assert out["usage"]["completion_tokens"] == 2048 - 2020


BAD_BODIES: list[tuple[str, Any]] = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[]"),
    ("/v1/completions", b"null"),
    ("/v1/completions", {"model": MODEL}),
    ("/v1/completions", {"model": MODEL, "prompt": ""}),
    ("/v1/completions", {"model": MODEL, "prompt": [-1, 5]}),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "ten"}),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}),
    ("/v1/completions", {"model": 5, "prompt": "a"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [], "stream": "maybe"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stream_options": 3}),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stop": 5}),
    ("/tokenize", {"model": MODEL}),
    ("/detokenize", {"model": MODEL, "tokens": ["a"]}),
    ("/v1/load_lora_adapter", {"lora_name": "x"}),
    ("/admin/faults", {"error_rate": 7}),
]


@pytest.mark.parametrize(("path", "body"), BAD_BODIES)
def test_bad_input_is_4xx_in_vllm_envelope_and_never_crashes(
    http: httpx.Client, path: str, body: Any
) -> None:
    if isinstance(body, bytes):
        resp = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert http.get("/health").status_code == 200


def test_empty_chat_messages_is_vllms_400(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [], "max_tokens": 2, "ignore_eos": True}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"] == {
        "message": "Cannot apply chat template to an empty conversation. Provide at least one "
        "message.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"max_tokens": 0}, "max_tokens",
         "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
        ({"max_completion_tokens": -3}, "max_tokens",
         "max_tokens must be at least 1, got -3. (parameter=max_tokens, value=-3)"),
        ({"n": 0}, None, "n must be at least 1, got 0."),
        ({"temperature": -0.5}, "temperature",
         "temperature must be non-negative, got -0.5. (parameter=temperature, value=-0.5)"),
        ({"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)"),
        ({"top_p": 1.5}, "top_p",
         "top_p must be in (0, 1], got 1.5. (parameter=top_p, value=1.5)"),
        ({"top_k": -2}, None, "top_k must be 0 (disable), or at least 1, got -2."),
        ({"min_p": 2}, None, "min_p must be in [0, 1], got 2.0."),
        ({"presence_penalty": 3}, None, "presence_penalty must be in [-2, 2], got 3.0."),
        ({"frequency_penalty": -2.5}, None, "frequency_penalty must be in [-2, 2], got -2.5."),
        ({"repetition_penalty": 0}, None, "repetition_penalty must be greater than zero, got 0.0."),
        ({"min_tokens": 5, "max_tokens": 2}, None,
         "min_tokens must be less than or equal to max_tokens=2, got 5."),
        # n is checked before max_tokens, as in SamplingParams._verify_args.
        ({"n": 0, "max_tokens": 0}, None, "n must be at least 1, got 0."),
    ],
)  # fmt: skip
def test_sampling_params_are_validated_like_vllm(
    http: httpx.Client, extra: dict[str, Any], param: str | None, message: str
) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, **extra}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == {
        "message": message, "type": "BadRequestError", "param": param, "code": 400
    }  # fmt: skip


def test_valid_sampling_edges_are_accepted(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "top_p": 1,
            "top_k": -1, "min_p": 0, "presence_penalty": -2, "frequency_penalty": 2,
            "min_tokens": 2}  # fmt: skip
    assert http.post("/v1/completions", json=body).status_code == 200


def test_prompt_filling_the_context_is_the_max_tokens_error(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": list(range(100, 2148)), "max_tokens": 5}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert (err["param"], err["message"]) == (
        "max_tokens",
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
    )


def test_ids_and_fingerprint_have_vllms_shape(http: httpx.Client) -> None:
    comp = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT,
                                                   "max_tokens": 1})  # fmt: skip
    assert re.fullmatch(r"cmpl-[0-9a-f]{16}", comp.json()["id"])
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", chat.json()["id"])
    fingerprint = comp.json()["system_fingerprint"]
    assert re.fullmatch(r"vllm-0\.32\.0-[0-9a-f]{8}", fingerprint)
    assert chat.json()["system_fingerprint"] == fingerprint
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        chunks, done = _sse(resp.read().decode())
    assert done and chunks[-1]["system_fingerprint"] == fingerprint


def test_bad_json_matches_vllm(http: httpx.Client) -> None:
    resp = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    err = resp.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("Bad Request", "body.1", 400)
    assert "'type': 'json_invalid'" in err["message"]
    assert err["message"].startswith("1 validation error:")


def test_unknown_route_and_method_keep_fastapi_bodies(http: httpx.Client) -> None:
    assert http.get("/nope").json() == {"detail": "Not Found"}
    resp = http.get("/v1/completions")
    assert (resp.status_code, resp.json()) == (405, {"detail": "Method Not Allowed"})


def test_seeded_fuzz_never_yields_a_server_error(http: httpx.Client) -> None:
    rng = random.Random(1234)
    values: list[Any] = [None, True, -1, 0, 1, 3, 2.5, "", "x", "smollm2", [], [1], ["a"], [[1]],
                         {}, {"a": 1}, [{"role": "user"}], [-5], "\ud7ff" * 3]  # fmt: skip
    fields = ["model", "prompt", "messages", "max_tokens", "n", "stop", "stream", "ignore_eos",
              "stream_options", "max_completion_tokens", "stop_token_ids", "request_id",
              "include_stop_str_in_output", "cache_salt", "user"]  # fmt: skip
    for i in range(150):
        body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 6))}
        body.setdefault("model", MODEL)
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0:
            body["max_tokens"] = 2
        body.pop("request_id", None)  # keep request ids unique
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize",
                           "/v1/completions/render", "/v1/chat/completions/render"])  # fmt: skip
        resp = http.post(path, json=body)
        assert resp.status_code in (200, 400, 404), (i, path, body, resp.text)
        if resp.status_code != 200:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/health").status_code == 200
