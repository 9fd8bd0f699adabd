"""Tokenizers for the simulated engine, and the ChatML chat template.

Two implementations of one small :class:`Tokenizer` protocol:

* :class:`HashTokenizer` (default, no files): text is split by a GPT-2-like regex into
  special tokens, words with their leading whitespace, and single punctuation marks; each
  piece maps to ``n_special + xxh3_64(piece) % (vocab_size - n_special)``.  Equal text gives
  equal ids (what prefix caching needs) and counts are roughly BPE-like (one id per word).
  ``decode`` is *not* the inverse: it renders every ordinary id as a deterministic
  pseudo-word (``" bako"``), injective per id, so generated ids become readable text. The
  few :data:`TEXT_PIECES` (punctuation, digits, newline) *do* round-trip, so generated
  text can contain what a ``stop`` sequence names.
* :class:`HFTokenizer`: a local ``tokenizer.json`` loaded with the ``tokenizers`` package
  (nothing is downloaded), for exact token counts against a real engine.

:func:`chat_prompt` renders OpenAI messages as ChatML (``<|im_start|>role\\ncontent<|im_end|>``),
the template SmolLM2 and Qwen use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import xxhash

from kvcache.prompt import message_text, render_chatml

__all__ = [
    "CHATML_SPECIALS",
    "TEXT_PIECES",
    "ChatCodec",
    "Message",
    "HFTokenizer",
    "HashTokenizer",
    "Tokenizer",
    "chat_prompt",
    "load_tokenizer",
    "text_piece_ids",
]

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Special tokens of ChatML models; ids 0, 1, 2 in SmolLM2's vocabulary and in HashTokenizer."""

TEXT_PIECES: tuple[str, ...] = (
    ",", ".", "!", "?", ":", ";", "-", "(", ")", "\n",
    *(str(d) for d in range(10)),
    *(f" {d}" for d in range(10)),
)  # fmt: skip
"""Pieces the output generator mixes into pseudo-text (``text_piece_ids``): punctuation,
digits and newlines, the characters ``stop`` sequences usually name."""

_PIECE = re.compile(r"<\|[A-Za-z0-9_]+\|>|\s*\w+|\s*[^\w\s]|\s+")
_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)  # 85


class Tokenizer(Protocol):
    """What the server needs: ids for text, text for ids, and the special ids."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def token_strs(self, ids: Sequence[int]) -> list[str]: ...


class HashTokenizer:
    """Deterministic, file-free tokenizer.

    Example: ``HashTokenizer(49152).encode("Hello, world")`` -> three ids, always the same.
    """

    __slots__ = ("_vocab", "_specials", "_special_ids", "_n_special", "_text")

    def __init__(self, vocab_size: int = 49152, specials: Sequence[str] = CHATML_SPECIALS):
        if vocab_size <= len(specials):
            raise ValueError("vocab_size must exceed the number of special tokens")
        self._vocab = vocab_size
        self._specials = tuple(specials)
        self._special_ids = {s: i for i, s in enumerate(self._specials)}
        self._n_special = len(self._specials)
        # Text pieces decode to themselves (first piece wins on a hash collision).
        self._text: dict[int, str] = {}
        for piece in TEXT_PIECES:
            self._text.setdefault(self.token_to_id(piece), piece)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_token_id(self) -> int | None:
        return self._special_ids.get("<|im_end|>", self._special_ids.get("<|endoftext|>"))

    def token_to_id(self, piece: str) -> int:
        """Id of one piece (special or ordinary)."""
        special = self._special_ids.get(piece)
        if special is not None:
            return special
        span = self._vocab - self._n_special
        return self._n_special + xxhash.xxh3_64_intdigest(piece.encode()) % span

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text`` (ChatML models add no BOS, so ``add_special_tokens`` changes nothing)."""
        return [self.token_to_id(m.group()) for m in _PIECE.finditer(text)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Pseudo-words for ordinary ids; special tokens verbatim unless skipped."""
        parts: list[str] = []
        for i in ids:
            if 0 <= i < self._n_special:
                if not skip_special_tokens:
                    parts.append(self._specials[i])
                continue
            text = self._text.get(i)
            parts.append(text if text is not None else self._word(i - self._n_special))
        return "".join(parts)

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """One string per id (special tokens verbatim), as ``/tokenize`` ``token_strs``."""
        return [self.decode((i,), skip_special_tokens=False) for i in ids]

    @staticmethod
    def _word(m: int) -> str:
        syl = [_SYLLABLES[m % 85]]
        m //= 85
        while m:
            syl.append(_SYLLABLES[m % 85])
            m //= 85
        return " " + "".join(reversed(syl))


class HFTokenizer:
    """A local ``tokenizer.json`` (Hugging Face ``tokenizers``); never downloads.

    Example: ``HFTokenizer("models/smollm2/tokenizer.json").encode("Hi")``.
    """

    __slots__ = ("_tok", "_eos")

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HF  # optional at import time of this module

        self._tok = _HF.from_file(str(path))
        eos = None
        for name in ("<|im_end|>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>"):
            eos = self._tok.token_to_id(name)
            if eos is not None:
                break
        self._eos: int | None = eos

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]


def load_tokenizer(path: str | Path | None = None, *, vocab_size: int = 49152) -> Tokenizer:
    """``HFTokenizer(path)`` when a path is given, else a :class:`HashTokenizer`."""
    if path is None:
        return HashTokenizer(vocab_size)
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return HFTokenizer(p)


class _Codec(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


def text_piece_ids(codec: _Codec) -> tuple[int, ...]:
    """Ids of the :data:`TEXT_PIECES` that are one token and decode back to themselves with
    ``codec`` (a :class:`ChatCodec`): what the core's output stream mixes into its tokens so
    that pseudo-text holds punctuation and digits (stop sequences can fire)."""
    out: list[int] = []
    for piece in TEXT_PIECES:
        ids = codec.encode(piece, add_special_tokens=False)
        if len(ids) == 1 and codec.decode(ids) == piece and ids[0] not in out:
            out.append(ids[0])
    return tuple(out)


Message = Mapping[str, Any] | tuple[str, str]
"""An OpenAI message mapping (``{"role", "content"}``) or a ``(role, content)`` pair."""


def chat_prompt(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    default_system: str | None = None,
) -> str:
    """Render OpenAI chat ``messages`` as a ChatML prompt.

    ``default_system`` is prepended when no system message is present (SmolLM2's template
    does this with "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
    """
    pairs = [
        m if isinstance(m, tuple) else (str(m.get("role", "user")), message_text(m.get("content")))
        for m in messages
    ]
    return render_chatml(
        pairs, add_generation_prompt=add_generation_prompt, default_system=default_system
    )


class ChatCodec:
    """Tokenizer + ChatML template + EOS ids: what the sim server's ``TextCodec`` needs.

    Example: ``ChatCodec(load_tokenizer(None)).chat_prompt([("user", "hi")],
    add_generation_prompt=True)``.
    """

    __slots__ = ("tokenizer", "_eos", "_default_system")

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token_ids: tuple[int, ...] | None = None,
        default_system: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self._eos = eos_token_ids if eos_token_ids is not None else (() if eos is None else (eos,))
        self._default_system = default_system

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def chat_prompt(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        return chat_prompt(
            messages,
            add_generation_prompt=add_generation_prompt,
            default_system=self._default_system,
        )

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        return self.tokenizer.token_strs(token_ids)
