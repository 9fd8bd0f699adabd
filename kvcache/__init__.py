"""Prefix block hashing and prefix indexes shared by the gateway, routing and enginesim."""

from __future__ import annotations

from kvcache.hashing import (
    NONE_HASH_DOMAIN,
    BlockKey,
    hash_byte_blocks,
    hash_token_blocks,
    root_hash,
)

__all__ = [
    "NONE_HASH_DOMAIN",
    "BlockKey",
    "hash_byte_blocks",
    "hash_token_blocks",
    "root_hash",
]
