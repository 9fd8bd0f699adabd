"""Prefix block hashing and prefix indexes shared by the gateway, routing and enginesim."""

from __future__ import annotations

from kvcache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecodeError,
    decode_kv_event_message,
)
from kvcache.hashing import (
    NONE_HASH_DOMAIN,
    BlockKey,
    hash_byte_blocks,
    hash_token_blocks,
    root_hash,
)
from kvcache.index import IndexStats, PrefixIndex
from kvcache.precise import EndpointFeed, FeedStats

__all__ = [
    "NONE_HASH_DOMAIN",
    "AllBlocksCleared",
    "BlockKey",
    "BlockRemoved",
    "BlockStored",
    "EndpointFeed",
    "FeedStats",
    "IndexStats",
    "KVEventBatch",
    "KVEventDecodeError",
    "PrefixIndex",
    "decode_kv_event_message",
    "hash_byte_blocks",
    "hash_token_blocks",
    "root_hash",
]
