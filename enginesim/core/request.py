"""Per-request mutable state inside the core, and its deterministic output-token stream.

The state is a mutable ``__slots__`` class rather than a frozen dataclass on purpose: the
scheduler advances ``num_computed`` and appends tokens every step, and copying an immutable
record per request per step would dominate the simulator's cost.

Output tokens: each request owns a ``random.Random`` seeded with
``xxh3_64(f"{engine_seed}/{request_id}")``.  Per token it draws ``u = random()`` and then
``t = randrange(first_output_token_id, vocab_size)``, always both, so the stream depends only
on (seed, request id) and never on batching, timing or preemption.  If ``stop_token_ids`` is
non-empty, ``ignore_eos`` is false and ``u < eos_probability``, the token is
``stop_token_ids[0]`` (an EOS) and the request finishes with ``"stop"``; the expected output
length is then ``min(max_tokens, 1 / eos_probability)``.  Otherwise, with ``text_ids`` given
and ``u`` in the next ``text_probability`` of the unit interval, the token is
``text_ids[t % len(text_ids)]`` (punctuation, digits, newlines: pseudo-text that a ``stop``
sequence can match). Random draws that happen to equal a stop id are shifted to the next id,
so stops come only from the EOS draw.
"""

from __future__ import annotations

import random

import xxhash

from enginesim.core.api import SimRequest
from kvcache.hashing import hash_token_blocks

__all__ = ["RequestState", "TokenStream"]


class TokenStream:
    """Deterministic pseudo-random token ids for one request.

    Example: ``TokenStream(seed=0, request_id="r1", lo=0, hi=100).next()`` is always the same.
    """

    __slots__ = ("_rng", "_lo", "_hi", "_stop", "_stop_set", "_eos_p", "_text", "_text_hi")

    def __init__(
        self,
        *,
        seed: int,
        request_id: str,
        lo: int,
        hi: int,
        stop_token_ids: tuple[int, ...] = (),
        eos_probability: float = 0.0,
        text_ids: tuple[int, ...] = (),
        text_probability: float = 0.0,
    ) -> None:
        if hi <= lo:
            raise ValueError("empty output token range")
        if not 0.0 <= text_probability <= 1.0:
            raise ValueError("text_probability must be in [0, 1]")
        self._rng = random.Random(xxhash.xxh3_64_intdigest(f"{seed}/{request_id}".encode()))
        self._lo, self._hi = lo, hi
        self._stop = stop_token_ids
        self._stop_set = frozenset(stop_token_ids)
        self._eos_p = eos_probability if stop_token_ids else 0.0
        self._text = text_ids
        self._text_hi = self._eos_p + text_probability if text_ids else -1.0

    def next(self) -> int:
        """The next token id (an EOS with probability ``eos_probability`` when stops are set)."""
        u = self._rng.random()
        tok = self._rng.randrange(self._lo, self._hi)
        if u < self._eos_p:
            return self._stop[0]
        if u < self._text_hi:
            return self._text[tok % len(self._text)]
        span = self._hi - self._lo
        for _ in range(len(self._stop_set)):
            if tok not in self._stop_set:
                break
            tok = self._lo + (tok - self._lo + 1) % span
        return tok


class RequestState:
    """One request's progress: tokens, computed count, blocks and hashes."""

    __slots__ = (
        "req",
        "request_id",
        "prompt",
        "prompt_len",
        "output",
        "num_computed",
        "blocks",
        "block_hashes",
        "num_cached_blocks",
        "num_cached_tokens",
        "adapter_size",
        "stream",
        "stop_ids",
        "num_preemptions",
        "counted",
        "scheduled",
        "num_external_tokens",
        "tier_written",
    )

    def __init__(self, req: SimRequest, *, stream: TokenStream, adapter_size: int = 0) -> None:
        self.req = req
        self.request_id = req.request_id
        self.prompt = req.prompt_token_ids
        self.prompt_len = len(req.prompt_token_ids)
        self.output: list[int] = []
        self.num_computed = 0
        self.blocks: list[int] = []
        self.block_hashes: list[int] = []
        # Leading blocks of ``blocks`` already registered in the prefix cache.
        self.num_cached_blocks = 0
        # Prefix-hit tokens at first admission (reported with the first token).
        self.num_cached_tokens = 0
        self.adapter_size = adapter_size
        self.stream = stream
        self.stop_ids = frozenset(req.stop_token_ids) if not req.ignore_eos else frozenset()
        self.num_preemptions = 0
        # Whether this request's prefix lookup was already counted in the stats.
        self.counted = False
        # Whether it was ever scheduled (reported once in ``StepResult.first_scheduled_ids``).
        self.scheduled = False
        # Of ``num_cached_tokens``, those loaded from the KV tier at first admission.
        self.num_external_tokens = 0
        # Leading prompt blocks already in the tier or queued for writing (tier only).
        self.tier_written = 0

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output)

    def tokens(self, lo: int, hi: int) -> list[int]:
        """Token ids ``[lo, hi)`` of prompt + output."""
        p = self.prompt_len
        if hi <= p:
            return list(self.prompt[lo:hi])
        if lo >= p:
            return self.output[lo - p : hi - p]
        return list(self.prompt[lo:]) + self.output[: hi - p]

    def update_hashes(self, block_size: int, model: str) -> None:
        """Extend ``block_hashes`` to every full block of the known tokens."""
        full = self.num_tokens // block_size
        have = len(self.block_hashes)
        if full <= have:
            return
        self.block_hashes.extend(
            hash_token_blocks(
                self.tokens(have * block_size, full * block_size),
                block_size,
                model=model,
                adapter=self.req.adapter,
                cache_salt=self.req.cache_salt,
                parent=self.block_hashes[-1] if have else None,
            )
        )
