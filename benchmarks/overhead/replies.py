"""Reply bodies of the fake engine (:mod:`.fake_engine`): OpenAI JSON and SSE, vLLM's render
and tokenize, SGLang's info endpoints, a small ``vllm:`` metrics page.

Everything that does not depend on the request is built once; per-request work is a dict
lookup or one small ``orjson.dumps``.
"""

from __future__ import annotations

import time
import zlib
from functools import lru_cache
from typing import Any

import orjson

MODEL = "fake-model"
CREATED = int(time.time())


def head(status: int, ctype: bytes, length: int | None) -> bytes:
    """A response head; ``length=None`` means chunked (SSE)."""
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"OK")
    size = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s\r\n\r\n" % (status, reason, ctype, size)


def json_reply(obj: Any, status: int = 200) -> bytes:
    body = orjson.dumps(obj)
    return head(status, b"application/json", len(body)) + body


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
NOT_FOUND = json_reply({"error": {"message": "not found", "type": "not_found"}}, 404)
BAD_REQUEST = json_reply({"error": {"message": "bad request", "type": "bad_request"}}, 400)
HEALTH = head(200, b"text/plain", 0)
MODELS = json_reply(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": CREATED, "owned_by": "fake",
                  "root": MODEL, "max_model_len": 32768}],
    }
)  # fmt: skip
SERVER_INFO = json_reply(
    {"model_path": MODEL, "tokenizer_path": MODEL, "served_model_name": MODEL,
     "is_generation": True, "max_total_num_tokens": 32768, "version": "0.0-fake"}
)  # fmt: skip
MODEL_INFO = json_reply({"model_path": MODEL, "tokenizer_path": MODEL, "is_generation": True})


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


@lru_cache(maxsize=512)
def completion_reply(chat: bool, tokens: int, prompt_tokens: int) -> bytes:
    """A whole non-stream response (cached: the fields that vary are the counts)."""
    text = " ".join(["tok"] * tokens)
    if chat:
        obj: dict[str, Any] = {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length", "logprobs": None}],
        }  # fmt: skip
    else:
        obj = {
            "id": "cmpl-fake", "object": "text_completion", "created": CREATED, "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
        }  # fmt: skip
    obj["usage"] = usage(prompt_tokens, tokens)
    return json_reply(obj)


def _sse(obj: dict[str, Any]) -> bytes:
    return chunk(b"data: " + orjson.dumps(obj) + b"\n\n")


@lru_cache(maxsize=4)
def stream_parts(chat: bool) -> tuple[bytes, bytes, bytes]:
    """(head + role delta, one content chunk, finish chunk) as wire-ready HTTP chunks."""
    base: dict[str, Any] = {
        "id": "chatcmpl-fake" if chat else "cmpl-fake",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": CREATED,
        "model": MODEL,
    }

    def choice(delta: dict[str, Any] | None, text: str, finish: str | None) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": delta or {"content": text}, "logprobs": None,
                    "finish_reason": finish}  # fmt: skip
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    first = head(200, b"text/event-stream", None)
    if chat:
        first += _sse({**base, "choices": [choice({"role": "assistant", "content": ""}, "", None)]})
    token = _sse({**base, "choices": [choice(None, " tok", None)]})
    finish = _sse({**base, "choices": [choice({}, "", "length")]})
    return first, token, finish


def stream_tail(chat: bool, include_usage: bool, prompt_tokens: int, tokens: int) -> bytes:
    """Usage chunk (when asked for), ``[DONE]`` and the last HTTP chunk."""
    out = b""
    if include_usage:
        out += _sse(
            {"id": "chatcmpl-fake" if chat else "cmpl-fake",
             "object": "chat.completion.chunk" if chat else "text_completion",
             "created": CREATED, "model": MODEL, "choices": [],
             "usage": usage(prompt_tokens, tokens)}
        )  # fmt: skip
    return out + chunk(b"data: [DONE]\n\n") + LAST_CHUNK


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt as text: chat messages' contents joined, or the completion prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = [m.get("content") for m in messages if isinstance(m, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def token_ids(text: str) -> list[int]:
    """Word-level fake token ids (stable, so a shared text prefix is a shared id prefix)."""
    return [zlib.crc32(w.encode()) % 32000 for w in text.split()]


def render_reply(body: dict[str, Any], chat: bool) -> bytes:
    """vLLM's ``/v1/{chat/,}completions/render`` shape (peer-lab §3): a list for completions."""
    item = {
        "request_id": "render-fake",
        "token_ids": token_ids(prompt_text(body)),
        "sampling_params": {"max_tokens": body.get("max_tokens", 16), "temperature": 1.0},
        "model": MODEL,
    }
    return json_reply(item if chat else [item])


def tokenize_reply(body: dict[str, Any]) -> bytes:
    ids = token_ids(prompt_text(body))
    return json_reply({"count": len(ids), "max_model_len": 32768, "tokens": ids,
                       "token_strs": None})  # fmt: skip


def metrics_reply(running: int, counts: dict[str, int]) -> bytes:
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{model_name="{MODEL}"}} {running}',
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} {min(1.0, running / 256):.4f}',
        "# TYPE fake_engine_requests_total counter",
    ]
    lines += [f'fake_engine_requests_total{{path="{p}"}} {n}' for p, n in sorted(counts.items())]
    body = ("\n".join(lines) + "\n").encode()
    return head(200, b"text/plain; version=0.0.4", len(body)) + body


def load_reply(running: int) -> bytes:
    """SGLang's ``/get_load`` (a list, one entry per data-parallel rank)."""
    return json_reply([{"dp_rank": 0, "num_reqs": running, "num_waiting_reqs": 0,
                        "num_tokens": running * 64}])  # fmt: skip
