"""A word-level ``tokenizer.json`` for the benchmark's pseudo-words, shared by gateway and engines.

Tier-aware routing works in token mode only (the gateway hashes token blocks exactly as the
engines key the tier), so the gateway and enginesim must tokenize alike. This writes one
``tokenizers`` WordLevel file: the ChatML specials (ids 0-2, as SmolLM2), ``[UNK]``, the role
names, punctuation, numbers 0-999 and the workload's vocabulary, one token per word. Built
locally in milliseconds; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

__all__ = ["SPECIALS", "write_tokenizer"]

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_BASE = ("[UNK]", "system", "user", "assistant", "doc", "session", "[", "]", ",", ".", ":",
         "!", "?", ";", "-", "(", ")")  # fmt: skip


def write_tokenizer(path: Path, words: Iterable[str]) -> tuple[Path, int]:
    """Write the tokenizer to ``path``; returns it and its vocabulary size."""
    vocab: dict[str, int] = {}
    for word in (*SPECIALS, *_BASE, *(str(n) for n in range(1000)), *words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path, len(vocab)
