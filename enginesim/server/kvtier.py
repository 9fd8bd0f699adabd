"""A simulated engine's side of the shared KV tier (``--kv-tier redis://...``): keys only.

The tier's index lives in Redis, in :mod:`kvcache.tier`'s format: one key per block under the
*residency namespace* (``residency_namespace(served model, block size)``: the block size is in
the namespace, the hashes are :func:`kvcache.hash_token_blocks` of the prompt token ids, the
same keys the real connector writes next to its tensor bytes and the gateway's tier-aware
routing reads). Values are size-only (``block_size * kv_bytes_per_token`` bytes recorded, no
tensor bytes): enginesim never needs the data, only whether it exists and how big it is.

* :meth:`TierClient.lookup` -- before a request enters the core: one pipelined EXISTS for the
  prompt's full blocks (at most ``(P - 1) // block_size``, vLLM's loadable limit), once per
  prompt (its ``n`` choices share the answer); the core gets the number of leading blocks
  present (``SimRequest.tier_blocks``) and decides at admission what to load beyond its local
  hit (:mod:`enginesim.core.tier`).
* :meth:`TierClient.offer` -- after each step, the hashes of prompt blocks the engine computed
  go to a bounded queue (oldest dropped, counted), never blocking the engine loop;
  :meth:`TierClient.run` writes them in batches with ``SET NX EX ttl`` (first writer wins).

Lookups and writes use two stores (two connection pools, two breakers), like the connector
whose save thread has a store of its own: a store's error counters then tell failed lookups
from failed writes. :meth:`TierClient.stats` gives the counters enginesim's ``/metrics``
exports as ``vllm:switchyard_kvtier_<name>_total`` (:mod:`enginesim.server.metrics`).

Failures never reach a request: the store answers a miss (0 blocks) or 0 writes and counts
the error (:class:`kvcache.blockstore.AsyncRedisBlockStore`). The lookup happens when the
request arrives, not when it is admitted (vLLM's connector asks at admission): blocks another
engine writes while this request waits in the queue are not seen (documented in
docs/kvtier.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.blockstore import AsyncBlockStore, Item
from kvcache.hashing import hash_token_blocks
from kvcache.tier import TierNamespace, residency_namespace
from kvcache.tierplan import max_loadable_blocks

__all__ = ["DEFAULT_TIER_TTL_S", "TierClient", "TierClientStats"]

log = logging.getLogger(__name__)

DEFAULT_TIER_TTL_S = 3600.0
MAX_QUEUED_WRITES = 65_536
WRITE_BATCH = 512


@dataclass(frozen=True, slots=True)
class TierClientStats:
    """Counters since start, named after the connector's (:data:`kvcache.tierplan.COUNTERS`)
    where they count the same thing; ``sim_*`` are enginesim's own."""

    lookups: int  # engine requests a lookup answered (each of a prompt's n choices, as vLLM)
    lookup_errors: int  # lookups that failed or were skipped (the breaker open)
    save_blocks: int  # blocks newly written (SET NX won)
    save_existing_blocks: int  # blocks whose key existed (another writer was first)
    save_failed_blocks: int  # blocks whose write failed or was skipped (not retried)
    save_dropped_blocks: int  # blocks not written: the bounded write queue was full
    sim_lookup_calls: int  # lookups sent to the store: one per prompt, shared by its choices
    sim_lookup_blocks: int  # prompt blocks those lookups asked about
    sim_lookup_found_blocks: int  # leading blocks the tier held (local hits included)
    sim_save_queued_blocks: int  # blocks waiting in the write queue now (a gauge)


class TierClient:
    """One engine's lookups and background writes against the tier's key index.

    Example::

        tier = TierClient(lookups, writes, model="smollm2", block_size=128,
                          block_bytes=2_949_120)
        tg.start_soon(tier.run)
        n = await tier.lookup(prompt_ids, adapter=None, cache_salt=None, requests=2)
        tier.offer(core.take_tier_writes())
    """

    def __init__(
        self,
        lookup_store: AsyncBlockStore,
        write_store: AsyncBlockStore,
        *,
        model: str,
        block_size: int,
        block_bytes: int,
        ttl_s: float = DEFAULT_TIER_TTL_S,
        max_queued: int = MAX_QUEUED_WRITES,
    ) -> None:
        if block_bytes <= 0 or ttl_s <= 0 or max_queued <= 0:
            raise ValueError("block_bytes, ttl_s and max_queued must be positive")
        if lookup_store is write_store:
            raise ValueError("lookups and writes need a store each (their errors are told apart)")
        self.lookup_store = lookup_store
        self.write_store = write_store
        self.model = model
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.ttl_s = ttl_s
        self.namespace: TierNamespace = residency_namespace(model, block_size)
        self._queue: deque[int] = deque(maxlen=max_queued)
        self._wake = asyncio.Event()
        self._requests = 0
        self._calls = 0
        self._looked_up = 0
        self._found = 0
        self._failed = 0
        self._dropped = 0

    def prompt_hashes(
        self, prompt_ids: Sequence[int], *, adapter: str | None, cache_salt: str | None
    ) -> list[int]:
        """The loadable blocks' hashes: the first ``(P - 1) // block_size`` full blocks
        (:func:`kvcache.tierplan.max_loadable_blocks`, the connector's limit)."""
        bs = self.block_size
        n = max_loadable_blocks(len(prompt_ids), bs)
        if not n:
            return []
        return hash_token_blocks(
            prompt_ids[: n * bs], bs, model=self.model, adapter=adapter, cache_salt=cache_salt
        )

    async def lookup(
        self,
        prompt_ids: Sequence[int],
        *,
        adapter: str | None,
        cache_salt: str | None,
        requests: int = 1,
    ) -> int:
        """Leading loadable prompt blocks the tier holds (one pipelined EXISTS; 0 on error).

        ``requests``: the engine requests the answer serves (a prompt's ``n`` choices; vLLM
        fans them out to the engine core, whose connector looks each one up)."""
        if requests < 1:
            raise ValueError("requests must be at least 1")
        hashes = self.prompt_hashes(prompt_ids, adapter=adapter, cache_salt=cache_salt)
        if not hashes:
            return 0
        found = await self.lookup_store.lookup(self.namespace, hashes)
        self._requests += requests
        self._calls += 1
        self._looked_up += len(hashes)
        self._found += found
        return found

    def offer(self, hashes: Sequence[int]) -> None:
        """Queue block hashes for writing (non-blocking; beyond the bound the oldest go)."""
        if not hashes:
            return
        q = self._queue
        room = q.maxlen or 0
        for h in hashes:
            if len(q) == room:
                self._dropped += 1
            q.append(h)
        self._wake.set()

    async def run(self) -> None:
        """Write queued blocks in batches (size-only values, SET NX EX); until cancelled."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self.flush_once()

    async def flush_once(self) -> int:
        """Write up to one batch now; returns the blocks newly written. One writer at a time
        (:meth:`run`): a failed batch is told from ``write_store``'s error counters."""
        q = self._queue
        batch: list[Item] = []
        while q and len(batch) < WRITE_BATCH:
            batch.append((q.popleft(), self.block_bytes))
        if not batch:
            return 0
        before = self.write_store.stats()
        written = await self.write_store.put_many(self.namespace, batch, ttl_s=self.ttl_s)
        after = self.write_store.stats()
        if after.failed > before.failed:
            self._failed += len(batch)  # only this writer uses write_store: the delta is ours
        return written

    def stats(self) -> TierClientStats:
        looked = self.lookup_store.stats()
        wrote = self.write_store.stats()
        return TierClientStats(
            lookups=self._requests,
            lookup_errors=looked.failed,
            save_blocks=wrote.puts,
            save_existing_blocks=wrote.put_existing,
            save_failed_blocks=self._failed,
            save_dropped_blocks=self._dropped,
            sim_lookup_calls=self._calls,
            sim_lookup_blocks=self._looked_up,
            sim_lookup_found_blocks=self._found,
            sim_save_queued_blocks=len(self._queue),
        )
