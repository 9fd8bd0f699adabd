"""Prompt -> chained prefix-block hashes, the key of prefix-cache-aware routing.

Two modes (DESIGN.md, "Prefix-cache-aware routing"):

* **bytes** (default, no files): the prompt text (chat: role and content of each message,
  NUL-separated) cut into ``block_bytes``-byte blocks. Equal prefixes give equal chains, so
  the approximate index (what we routed) works; the blocks do not align with the engine's.
* **tokens** (``routing.prefix.tokenizer`` names a local ``tokenizer.json``): chat messages
  rendered with the ChatML template (what vLLM does for ChatML models, and enginesim always)
  and tokenised; token blocks of the engine's block size. These match the blocks that KV
  events report, so the precise index applies. Prompts longer than ``thread_above_chars``
  are tokenised in a worker thread (bounded by a :class:`anyio.CapacityLimiter`) so a huge
  prompt cannot stall the event loop; short ones inline (a thread hop costs more than the
  encode, see ``benchmarks/gateway_overhead.py``).

Completions with a token-id prompt hash the ids directly in both modes. Hashing itself is
:mod:`kvcache.hashing` (seeded by model and adapter) -- never another function.

Example::

    hasher = PromptHasher(PrefixSettings())
    blocks = await hasher.blocks(Kind.CHAT, messages, model="llama", adapter=None)
    blocks.hashes, blocks.block_tokens
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread

from gateway.parsing import CHARS_PER_TOKEN, Kind
from gateway.settings import PrefixSettings
from kvcache import hash_byte_blocks, hash_token_blocks
from kvcache.prompt import message_text, render_chatml

__all__ = ["Blocks", "PromptHasher", "chatml", "prompt_text"]


class _Encoder(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Blocks:
    """A request's block hashes; ``prompt_tokens`` is exact in token mode, else ``None``."""

    hashes: tuple[int, ...]
    block_tokens: int
    mode: str  # "bytes" | "tokens" | "none"
    prompt_tokens: int | None = None


NO_BLOCKS = Blocks((), 16, "none")


def _pairs(messages: Sequence[Any]) -> list[tuple[str, str]]:
    return [
        (str(m.get("role", "user")), message_text(m.get("content")))
        for m in messages
        if isinstance(m, Mapping)
    ]


def chatml(messages: Sequence[Any], *, default_system: str | None = None) -> str:
    """OpenAI messages as a ChatML prompt with the generation prompt appended."""
    return render_chatml(_pairs(messages), default_system=default_system)


def prompt_text(kind: Kind, prompt: Any) -> str | None:
    """The text byte blocks are cut from; ``None`` when the prompt has no single text."""
    if kind is Kind.CHAT and isinstance(prompt, list):
        return "\x00".join(f"{role}\x00{content}" for role, content in _pairs(prompt))
    if kind is Kind.COMPLETIONS and isinstance(prompt, str):
        return prompt
    if kind is Kind.COMPLETIONS and isinstance(prompt, list) and len(prompt) == 1:
        return prompt[0] if isinstance(prompt[0], str) else None
    return None


def _token_ids(kind: Kind, prompt: Any) -> list[int] | None:
    if kind is not Kind.COMPLETIONS or not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    return None


def load_encoder(path: Path) -> _Encoder:
    """A local ``tokenizer.json`` (or a directory holding one); never downloads."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"routing.prefix.tokenizer: no tokenizer.json at {path}")
    tok = Tokenizer.from_file(str(file))

    class _HF:
        def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
            ids: list[int] = tok.encode(text, add_special_tokens=add_special_tokens).ids
            return ids

    return _HF()


class PromptHasher:
    """Turns a request's prompt into :class:`Blocks`; see the module docstring."""

    def __init__(self, settings: PrefixSettings, *, max_threads: int = 2) -> None:
        self._settings = settings
        self._encoder = load_encoder(settings.tokenizer) if settings.tokenizer else None
        self._limiter = anyio.CapacityLimiter(max_threads)

    @property
    def mode(self) -> str:
        return "tokens" if self._encoder is not None else "bytes"

    async def blocks(
        self,
        kind: Kind,
        prompt: Any,
        *,
        model: str,
        adapter: str | None,
        block_tokens: int | None = None,
    ) -> Blocks:
        """Hashes of ``prompt``'s full blocks; ``block_tokens`` is the engines' block size."""
        size = block_tokens or self._settings.block_tokens
        ids = _token_ids(kind, prompt)
        if ids is not None:
            hashes = hash_token_blocks(ids, size, model=model, adapter=adapter)
            return Blocks(tuple(hashes), size, "tokens", len(ids))
        if self._encoder is not None:
            return await self._token_blocks(kind, prompt, size, model=model, adapter=adapter)
        text = prompt_text(kind, prompt)
        if text is None:
            return NO_BLOCKS
        step = self._settings.block_bytes
        hashes = hash_byte_blocks(text.encode(), step, model=model, adapter=adapter)
        return Blocks(tuple(hashes), max(1, step // CHARS_PER_TOKEN), "bytes")

    async def _token_blocks(
        self, kind: Kind, prompt: Any, size: int, *, model: str, adapter: str | None
    ) -> Blocks:
        if kind is Kind.CHAT and isinstance(prompt, list):
            text = chatml(prompt, default_system=self._settings.default_system)
            special = False
        else:
            plain = prompt_text(kind, prompt)
            if plain is None:
                return NO_BLOCKS
            text, special = plain, True
        encoder = self._encoder
        assert encoder is not None
        if len(text) > self._settings.thread_above_chars:
            ids = await anyio.to_thread.run_sync(
                lambda: encoder.encode(text, add_special_tokens=special), limiter=self._limiter
            )
        else:
            ids = encoder.encode(text, add_special_tokens=special)
        hashes = hash_token_blocks(ids, size, model=model, adapter=adapter)
        return Blocks(tuple(hashes), size, "tokens", len(ids))
