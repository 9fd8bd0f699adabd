"""Fast checks (no real engine) of what tests/contract/test_sdk_gaps_contract.py compares with
vLLM: synthetic logprobs, stop strings on the pseudo-text, the first SSE event, and the
prompt-token accounting counters."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from tests.contract.helpers import scrape
from tests.contract.tier_metrics import assert_vllm_accounting, tier_counters
from tests.enginesim.server_harness import MODEL

CHAT = [{"role": "user", "content": "Count: 1, 2, 3"}]


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = http.post(path, json={"model": MODEL, **body})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_chat_logprobs_are_well_formed_and_deterministic(http: httpx.Client) -> None:
    body = {"messages": CHAT, "max_tokens": 6, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 3, "request_id": "lp-1"}  # fmt: skip
    out = _post(http, "/v1/chat/completions", body)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    assert "".join(e["token"] for e in content) == out["choices"][0]["message"]["content"]
    for e in content:
        tops = e["top_logprobs"]
        assert len(tops) == 3 and len({t["token"] for t in tops}) == 3
        assert (tops[0]["token"], tops[0]["logprob"]) == (e["token"], e["logprob"])
        values = [t["logprob"] for t in tops]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert e["bytes"] == list(e["token"].encode())
    again = _post(http, "/v1/chat/completions", body | {"request_id": "lp-1"})
    assert again["choices"][0]["logprobs"] == out["choices"][0]["logprobs"]
    plain = _post(http, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
    assert plain["choices"][0]["logprobs"] is None


def test_completion_logprobs_offsets_and_top_dicts(http: httpx.Client) -> None:
    for k in (0, 1, 4):
        out = _post(http, "/v1/completions", {"prompt": "1, 2, 3", "max_tokens": 5,
                                              "ignore_eos": True, "logprobs": k})  # fmt: skip
        lp = out["choices"][0]["logprobs"]
        assert "".join(lp["tokens"]) == out["choices"][0]["text"]
        offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]
        assert lp["text_offset"] == offsets
        for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                   strict=True):  # fmt: skip
            assert len(top) == max(1, k) and top[tok] == value


def test_stop_strings_fire_on_pseudo_text(http: httpx.Client) -> None:
    stops = [",", ".", "\n", "1"]
    fired = 0
    for i in range(5):
        body = {"prompt": "hi", "max_tokens": 400, "stop": stops, "ignore_eos": True,
                "request_id": f"stop-{i}"}  # fmt: skip
        out = _post(http, "/v1/completions", body)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] in stops
        assert not any(s in choice["text"] for s in stops)
        fired += out["usage"]["completion_tokens"] < 400
    assert fired == 5
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                              "stop": [*stops, "2"]})  # fmt: skip
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "body.stop"


def test_role_delta_goes_out_with_the_first_token(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "n": 2, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        raw = resp.iter_raw()
        first_raw = next(raw)
        rest = b"".join(raw)
    events = [e for e in (first_raw + rest).split(b"\n\n") if e]
    first_write = [e for e in first_raw.split(b"\n\n") if e]
    # The first write carries both role deltas and the first token's chunk.
    assert len(first_write) >= 3
    chunks = [orjson.loads(e[len(b"data: ") :]) for e in first_write[:3]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant",
                                                               "content": ""}] * 2  # fmt: skip
    assert "content" in chunks[2]["choices"][0]["delta"]
    assert events[-1] == b"data: [DONE]"


def test_prompt_token_accounting_without_a_tier(http: httpx.Client) -> None:
    prompt = list(range(1000, 1000 + 3 * 128 + 5))
    for repeat in range(2):
        before = tier_counters(scrape(http), MODEL)
        _post(http, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        d = tier_counters(scrape(http), MODEL) - before
        assert_vllm_accounting(d, prompt_tokens=len(prompt), connector=False)
        assert d.by_source["local_cache_hit"] == (3 * 128 if repeat else 0)
