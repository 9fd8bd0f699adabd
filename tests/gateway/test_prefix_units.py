"""Prompt hashing modes, the ChatML renderer, routing settings and the Router's hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from enginesim.core.tokenizer import chat_prompt
from gateway.endpoints import EndpointRegistry, ModelCard
from gateway.errors import InvalidField
from gateway.exchange import FinishedRequest
from gateway.metrics import GatewayMetrics
from gateway.parsing import Kind, parse_request
from gateway.prefix import PromptHasher, chatml
from gateway.router import Router
from gateway.settings import PrefixSettings, Settings
from kvcache import hash_token_blocks


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "system": 4}
    vocab.update({f"w{i}": 5 + i for i in range(100)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def test_chatml_matches_the_engine_template() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]},
    ]
    assert chatml(messages) == chat_prompt(messages)
    user_only = [{"role": "user", "content": "x"}]
    assert chatml(user_only, default_system="S") == chat_prompt(user_only, default_system="S")


@pytest.mark.anyio
async def test_byte_blocks_share_prefixes_and_are_seeded() -> None:
    hasher = PromptHasher(PrefixSettings(block_bytes=16))
    assert hasher.mode == "bytes"
    system = {"role": "system", "content": "s" * 100}
    a = await hasher.blocks(
        Kind.CHAT, [system, {"role": "user", "content": "a" * 40}], model="m", adapter=None
    )
    b = await hasher.blocks(
        Kind.CHAT, [system, {"role": "user", "content": "b" * 40}], model="m", adapter=None
    )
    assert a.mode == "bytes" and a.block_tokens == 4 and a.prompt_tokens is None
    shared = 100 // 16  # "system\0" + 100 chars: the first 6 full blocks are system-only
    assert a.hashes[:shared] == b.hashes[:shared] and a.hashes[-1] != b.hashes[-1]
    other = await hasher.blocks(
        Kind.CHAT, [system, {"role": "user", "content": "a" * 40}], model="m", adapter="lora"
    )
    assert not set(other.hashes) & set(a.hashes)
    completion = await hasher.blocks(Kind.COMPLETIONS, "x" * 64, model="m", adapter=None)
    assert len(completion.hashes) == 4
    ids = await hasher.blocks(Kind.COMPLETIONS, list(range(40)), model="m", adapter=None)
    assert ids.mode == "tokens" and ids.prompt_tokens == 40
    assert list(ids.hashes) == hash_token_blocks(list(range(40)), 16, model="m")
    assert (await hasher.blocks(Kind.EMBEDDINGS, "x" * 64, model="m", adapter=None)).hashes == ()
    assert (await hasher.blocks(Kind.COMPLETIONS, ["a", "b"], model="m", adapter=None)).mode == (
        "none"
    )


@pytest.mark.anyio
async def test_token_blocks_inline_and_in_a_thread_agree(tmp_path: Path) -> None:
    path = _tokenizer(tmp_path)
    words = " ".join(f"w{i % 100}" for i in range(200))
    messages = [{"role": "user", "content": words}]
    inline = PromptHasher(PrefixSettings(tokenizer=path, thread_above_chars=10**6))
    threaded = PromptHasher(PrefixSettings(tokenizer=tmp_path, thread_above_chars=0))
    a = await inline.blocks(Kind.CHAT, messages, model="m", adapter=None, block_tokens=16)
    b = await threaded.blocks(Kind.CHAT, messages, model="m", adapter=None, block_tokens=16)
    assert a == b and a.mode == "tokens"
    # <|im_start|> user <words> <|im_end|> <|im_start|> assistant(unk)
    assert a.prompt_tokens == 2 + 200 + 2 + 1
    assert len(a.hashes) == a.prompt_tokens // 16
    c = await inline.blocks(Kind.CHAT, messages, model="m", adapter=None, block_tokens=32)
    assert c.block_tokens == 32 and len(c.hashes) == a.prompt_tokens // 32


def test_routing_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no tokenizer.json"):
        Settings.model_validate({"routing": {"prefix": {"tokenizer": str(tmp_path)}}})
    with pytest.raises(ValidationError, match="unknown routing policy"):
        Settings.model_validate({"routing": {"policy": "nope"}})
    with pytest.raises(ValidationError):
        Settings.model_validate({"routing": {"prefix": {"max_pairs": 0}}})
    settings = Settings.model_validate(
        {"routing": {"session_header": "X-Conversation", "scrape_interval_s": 0.25}}
    )
    assert settings.routing.session_header == "x-conversation"


def _router(**routing: Any) -> Router:
    settings = Settings.model_validate({"routing": {"policy": "prefix-cache", **routing}})
    registry = EndpointRegistry()
    for eid in ("a", "b"):
        state = registry.add(f"http://{eid}.invalid:8000", endpoint_id=eid)
        state.record_probe(True, fail_threshold=1, success_threshold=1)
        state.set_models([ModelCard("m")])
    return Router(settings, registry, GatewayMetrics.create(registry))


def _finished(usage: dict[str, int] | None) -> FinishedRequest:
    return FinishedRequest(None, "a", "m", None, False, 200, "ok", 0.1, None, 10, usage)


@pytest.mark.anyio
async def test_router_records_prefixes_on_commit_and_settles_vtc() -> None:
    router = _router()
    body = {"model": "m", "user": "alice",
            "messages": [{"role": "user", "content": "hello world " * 40}]}  # fmt: skip
    fields = parse_request(orjson.dumps(body), Kind.CHAT)
    policy = router.policy(None)
    first = await router.route(Kind.CHAT, fields, model="m", adapter=None, policy=policy)
    assert first.route.prefix_blocks == {} and first.blocks.hashes
    assert router.vtc.view("alice").active_users == 1
    first.committed("b", 503)  # an error answer holds no prefix
    assert router.index.match(first.blocks.hashes) == {}
    first.committed("b", 200)
    first.finished(_finished({"prompt_tokens": 100, "completion_tokens": 5}))
    first.finished(_finished({"prompt_tokens": 100, "completion_tokens": 5}))  # idempotent
    assert router.vtc.counter("alice") == 100 + 2 * 5
    assert router.vtc.view("alice").active_users == 0
    second = await router.route(Kind.CHAT, fields, model="m", adapter=None, policy=policy)
    assert second.route.prefix_blocks == {"b": len(first.blocks.hashes)}
    assert second.decision.ranked[0].id == "b"
    assert "match=b:" in second.explain()
    with pytest.raises(InvalidField):
        router.policy("astrology")
    assert router.policy("round-robin").name == "round-robin"
