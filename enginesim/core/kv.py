"""Paged KV cache with vLLM-style automatic prefix caching.

``num_blocks`` blocks of ``block_size`` tokens.  Every block has a reference count and, once
it is full and computed, the chained hash of its prefix (``kvcache.hash_token_blocks``).
Blocks with reference count 0 sit in one free queue ordered for eviction (front = evicted
first), as vLLM's ``FreeKVCacheBlockQueue``:

* all blocks start free, in id order;
* a request frees its blocks *tail first* (``reversed(blocks)`` appended to the back), so
  among blocks freed together the chain tail is evicted first and the shared head lives on;
* a prefix hit on a free cached block takes it out of the queue (``touch``);
* allocation pops from the front; popping a block that still carries a hash evicts that
  hash (``BlockRemoved``).

Only full blocks are hashed, so only full blocks can hit.  Cached-but-free blocks count as
free for :attr:`usage`, as in vLLM's ``kv_cache_usage_perc``.  A hash computed twice (two
requests prefilling the same prefix concurrently) is registered once; the duplicate block
stays anonymous and is reused without an event.

Everything is O(blocks touched): no walk over the whole cache per step.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from enginesim.core.api import KVEvent

__all__ = ["KVCache"]

DEFAULT_MAX_EVENTS = 100_000
"""Bound of the undrained event buffer (vLLM's ``max_queue_size``); the oldest are dropped."""


class KVCache:
    """Block pool + prefix-cache index + KV event buffer.

    Example::

        kv = KVCache(num_blocks=8, block_size=16)
        blocks = kv.allocate(2)  # [0, 1]
        kv.free(blocks)          # block 1 is now first in line for eviction
    """

    __slots__ = (
        "num_blocks",
        "block_size",
        "_ref",
        "_hash",
        "_free",
        "_cached",
        "_events",
        "dropped_events",
    )

    def __init__(self, num_blocks: int, block_size: int, *, max_events: int = DEFAULT_MAX_EVENTS):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}
        self._events: deque[KVEvent] = deque(maxlen=max_events)
        self.dropped_events = 0

    # --- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with no reference (including evictable cached ones)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (vLLM ``kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks currently holding a registered prefix hash."""
        return len(self._cached)

    def free_order(self) -> list[int]:
        """Free block ids in eviction order (front first); O(free), for tests and debugging."""
        return list(self._free)

    def block_hash(self, block: int) -> int | None:
        return self._hash[block]

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def longest_hit(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix among the first ``max_blocks`` hashes."""
        hit: list[int] = []
        cached = self._cached
        for h in hashes[:max_blocks]:
            block = cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def can_allocate(self, num_new: int, hit_blocks: Sequence[int] = ()) -> bool:
        """Whether ``num_new`` fresh blocks fit after touching ``hit_blocks``."""
        evictable_hits = sum(1 for b in hit_blocks if self._ref[b] == 0)
        return num_new + evictable_hits <= len(self._free)

    # --- mutations -----------------------------------------------------------------------
    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on (prefix-hit) blocks, pulling free ones out of the queue."""
        ref, free = self._ref, self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """Pop ``n`` blocks from the front of the free queue (evicting hashes), or ``None``."""
        if n > len(self._free):
            return None
        out: list[int] = []
        free, ref, hashes = self._free, self._ref, self._hash
        for _ in range(n):
            b, _none = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                hashes[b] = None
                if self._cached.get(h) == b:
                    del self._cached[h]
                self._emit(KVEvent(kind="BlockRemoved", block_hashes=(h,)))
            ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; blocks reaching 0 join the queue tail-first."""
        ref, free = self._ref, self._free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
            elif ref[b] < 0:
                raise AssertionError(f"block {b} freed twice")

    def cache(
        self,
        blocks: Sequence[int],
        hashes: Sequence[int],
        *,
        start: int,
        stop: int,
        tokens: Sequence[int],
        lora_name: str | None,
    ) -> None:
        """Register blocks ``start..stop-1`` (now full and computed) under their hashes.

        ``tokens`` are the token ids of exactly those blocks. Emits one ``BlockStored`` per
        run of consecutive newly registered blocks, parented on the previous block's hash.
        """
        run: list[int] = []
        run_start = start
        for i in range(start, stop):
            b, h = blocks[i], hashes[i]
            if self._hash[b] is None and h not in self._cached:
                self._hash[b] = h
                self._cached[h] = b
                if not run:
                    run_start = i
                run.append(h)
                continue
            if run:
                self._store_event(run, run_start, start, hashes, tokens, lora_name)
                run = []
        if run:
            self._store_event(run, run_start, start, hashes, tokens, lora_name)

    def reset(self) -> bool:
        """Forget all cached hashes (vLLM ``reset_prefix_cache``); refused while blocks are used."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        self._emit(KVEvent(kind="AllBlocksCleared"))
        return True

    def take_events(self) -> list[KVEvent]:
        """Drain buffered events, oldest first."""
        out = list(self._events)
        self._events.clear()
        return out

    # --- internals -----------------------------------------------------------------------
    def _store_event(
        self,
        run: list[int],
        run_start: int,
        start: int,
        hashes: Sequence[int],
        tokens: Sequence[int],
        lora_name: str | None,
    ) -> None:
        bs = self.block_size
        lo = (run_start - start) * bs
        self._emit(
            KVEvent(
                kind="BlockStored",
                block_hashes=tuple(run),
                parent_block_hash=hashes[run_start - 1] if run_start > 0 else None,
                token_ids=tuple(tokens[lo : lo + len(run) * bs]),
                block_size=bs,
                lora_name=lora_name,
            )
        )

    def _emit(self, event: KVEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped_events += 1
        self._events.append(event)
