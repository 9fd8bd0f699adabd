"""Apply decoded KV events from one engine to a :class:`~kvcache.index.PrefixIndex` (pure).

An engine's block hashes are only meaningful inside that engine process (vLLM's ``NONE_HASH``
is random per process unless ``PYTHONHASHSEED`` is fixed), so they cannot be compared with the
gateway's request hashes or across engines. Each ``BlockStored`` therefore carries its
``token_ids``, and we *re-hash* them with :func:`kvcache.hashing.hash_token_blocks`, chaining
from our own hash of the parent block. A bounded per-endpoint table maps the engine's hash to
ours so later ``BlockRemoved`` events (which carry only engine hashes) and child blocks can be
resolved.

If a parent is unknown (an event was lost, or the feed started mid-stream), the chain cannot
be re-hashed and the event is counted in ``unchained``; that endpoint then falls back to its
speculative entries for those prefixes. A sequence gap also clears nothing by itself: the
gateway may ask the engine for a replay, or call :meth:`EndpointFeed.reset`.

The request side must hash with the engine's block size and the same tokenizer for matches to
occur (precise mode needs a configured ``tokenizer.json``).

Example::

    feed = EndpointFeed("e1", index, model="llama3-8b")
    feed.apply(decode_kv_event_message(frames))
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvcache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineBlockHash,
    KVEvent,
    KVEventBatch,
)
from kvcache.hashing import hash_token_blocks
from kvcache.index import PrefixIndex

__all__ = ["EndpointFeed", "FeedStats"]


@dataclass(frozen=True, slots=True)
class FeedStats:
    """Counters for metrics and for detecting a broken feed."""

    batches: int
    stored_blocks: int
    removed_blocks: int
    unchained: int
    seq_gaps: int
    known_blocks: int


class EndpointFeed:
    """Translates one endpoint's KV events into precise index entries. Single owner."""

    def __init__(
        self,
        endpoint: str,
        index: PrefixIndex,
        *,
        model: str,
        max_blocks: int = 1_000_000,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self._index = index
        self._max_blocks = max_blocks
        self._ours: OrderedDict[EngineBlockHash, int] = OrderedDict()
        self._last_seq: int | None = None
        self._batches = 0
        self._stored = 0
        self._removed = 0
        self._unchained = 0
        self._gaps = 0
        index.enable_precise(endpoint)

    def apply(self, batch: KVEventBatch) -> None:
        """Apply every event of a batch, in order."""
        if self._last_seq is not None and batch.seq >= 0 and batch.seq != self._last_seq + 1:
            self._gaps += 1
        if batch.seq >= 0:
            self._last_seq = batch.seq
        self._batches += 1
        for event in batch.events:
            self.apply_event(event)

    def apply_event(self, event: KVEvent) -> None:
        if isinstance(event, BlockStored):
            self._store(event)
        elif isinstance(event, BlockRemoved):
            popped = (self._ours.pop(e, None) for e in event.block_hashes)
            ours = [h for h in popped if h is not None]
            self._index.remove_precise(self.endpoint, ours)
            self._removed += len(ours)
        elif isinstance(event, AllBlocksCleared):
            self.reset()

    def reset(self) -> None:
        """Forget everything this engine reported (cache cleared, restart, lost feed)."""
        self._ours.clear()
        self._index.clear_precise(self.endpoint)

    def stats(self) -> FeedStats:
        return FeedStats(
            batches=self._batches,
            stored_blocks=self._stored,
            removed_blocks=self._removed,
            unchained=self._unchained,
            seq_gaps=self._gaps,
            known_blocks=len(self._ours),
        )

    def _store(self, event: BlockStored) -> None:
        parent: int | None = None
        if event.parent_block_hash is not None:
            parent = self._ours.get(event.parent_block_hash)
            if parent is None:
                self._unchained += 1
                return
        ours = hash_token_blocks(
            event.token_ids,
            event.block_size,
            model=self.model,
            adapter=event.lora_name,
            parent=parent,
        )
        for engine_hash, our_hash in zip(event.block_hashes, ours, strict=False):
            self._ours[engine_hash] = our_hash
            self._ours.move_to_end(engine_hash)
        while len(self._ours) > self._max_blocks:
            self._ours.popitem(last=False)
        self._index.store_precise(self.endpoint, ours)
        self._stored += len(ours)
