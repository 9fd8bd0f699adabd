"""Chained prefix-block hashing: the one hashing function the whole project uses.

Mirrors vLLM's scheme (``vllm/v1/core/kv_cache_utils.py``): a prompt is cut into fixed-size
blocks, only *full* blocks are hashed, and block ``i``'s hash covers its parent's hash, so a
hash identifies the whole prefix up to and including that block.  The chain is seeded by a
root hash of ``(model, adapter, cache_salt)`` so the same text under another model, another
LoRA adapter or another tenant salt never matches (vLLM puts the LoRA name and ``cache_salt``
into ``extra_keys`` for the same reason).

We use 64-bit xxh3 instead of vLLM's pickle+SHA-256: it is ~50x cheaper on the gateway's hot
path and deterministic across processes (vLLM's ``NONE_HASH`` is random per process unless
``PYTHONHASHSEED`` is fixed).  Consumers of real vLLM KV events therefore re-hash the
``token_ids`` carried in ``BlockStored`` with this function instead of trusting the engine's
hash values.

Example::

    >>> from kvcache import hash_token_blocks
    >>> len(hash_token_blocks(list(range(40)), 16, model="m"))  # 2 full blocks
    2
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

NONE_HASH_DOMAIN = b"switchyard-prefix-v1"
"""Domain-separation prefix of the root hash; change it to invalidate every stored key."""

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class BlockKey:
    """What seeds a hash chain: blocks hash alike only under the same key.

    Example: ``BlockKey(model="llama", adapter="sql-lora")``.
    """

    model: str
    adapter: str | None = None
    cache_salt: str | None = None


def root_hash(model: str, adapter: str | None = None, cache_salt: str | None = None) -> int:
    """The parent hash of a chain's first block, seeded by model, adapter and salt."""
    seed = b"\x00".join(
        (
            NONE_HASH_DOMAIN,
            model.encode(),
            (adapter or "").encode(),
            (cache_salt or "").encode(),
        )
    )
    return xxhash.xxh3_64_intdigest(seed)


def _chain(parent: int, payloads: Sequence[bytes]) -> list[int]:
    out: list[int] = []
    for payload in payloads:
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + payload)
        out.append(parent & _MASK64)
    return out


def hash_token_blocks(
    token_ids: Sequence[int],
    block_size: int,
    *,
    model: str,
    adapter: str | None = None,
    cache_salt: str | None = None,
    parent: int | None = None,
) -> list[int]:
    """Chained hashes of every *full* block of ``block_size`` token ids.

    ``parent`` continues an existing chain (e.g. the hash of the last block already hashed);
    when omitted the chain starts at :func:`root_hash`.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    full = len(token_ids) // block_size
    if full == 0:
        return []
    packed = array("I", token_ids[: full * block_size]).tobytes()
    width = block_size * 4
    start = root_hash(model, adapter, cache_salt) if parent is None else parent
    return _chain(start, [packed[i * width : (i + 1) * width] for i in range(full)])


def hash_byte_blocks(
    data: bytes,
    block_size: int,
    *,
    model: str,
    adapter: str | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """Chained hashes of every full ``block_size``-byte block of ``data``.

    The approximate mode used when no tokenizer is configured: byte blocks do not align
    with the engine's token blocks, but equal prefixes still give equal hash chains. (These
    hashes never meet the engine's: they key the gateway's approximate index only.)
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    end = len(data) // block_size * block_size
    parent = root_hash(model, adapter, cache_salt)
    view = memoryview(data)
    out: list[int] = []
    # The parent is the block's xxh3 seed: no per-block copy and concatenation, so a 32 KB
    # prompt (500 blocks of 64 B) hashes in about half the time of the token chain's form.
    for offset in range(0, end, block_size):
        parent = xxhash.xxh3_64_intdigest(view[offset : offset + block_size], parent)
        out.append(parent)
    return out
