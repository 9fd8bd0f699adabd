"""The KV tier's key and value format: one Redis key per KV block, a checked header per value.

Pure (no Redis import): the vLLM connector, enginesim and the gateway all build keys and
values with these functions, so the three can never disagree on the format.

**Namespace.** :class:`TierNamespace` holds everything that makes two blocks with the same
hash incompatible (model and revision, dtype and KV-cache dtype, block size, tensor-parallel
rank and size, memory layout, hash algorithm). Its canonical form is hashed (xxh64) into
``prefix`` = ``b"kv1:<16 hex>:"``; different namespaces never share a key, and the same
digest sits in every value's header so a value copied under the wrong key is a miss.

**Key.** ``block_key(ns, h)`` = prefix + the block hash in hex: vLLM's own chained block hash
(``request.block_hashes``, bytes) in the connector; ints are accepted too (enginesim and the
gateway's residency keys, see :func:`residency_namespace`).

**Value.** A fixed 48-byte little-endian header, then the payload::

    offset size field
    0      4    magic b"SYKV"
    4      1    version (1)
    5      1    flags (bit 0: size-only, the payload is empty and ``nbytes`` is the size)
    6      2    reserved (0)
    8      8    namespace digest (xxh64 of the canonical namespace)
    16     8    block-hash digest (xxh64 of the block hash bytes)
    24     8    payload length (bytes after the header)
    32     8    nbytes (logical block size: = payload length, or the size of a size-only value)
    40     8    checksum (xxh3_64 of the payload)

:func:`decode_block` returns the payload only when every field matches; any mismatch
(magic, version, namespace, hash, length, checksum) or a size-only value returns ``None``: a
miss, never garbage. Size-only values (``encode_block(ns, h, b"", nbytes=N)``) let enginesim
and the gateway record residency without tensor bytes; :func:`read_header` reads their size.

**Redis Cluster: no hash tag.** Keys carry no ``{...}`` hash tag, so a prefix's blocks spread
over the shards by key (CRC16 slot of the whole key). A hash tag on the namespace would pin a
whole model's blocks to one shard (one hot shard, no capacity or bandwidth scaling); a tag per
prefix is impossible because a block is shared by every prompt that extends it. The cost is
that a lookup touches several shards: a cluster pipeline (redis-py's ``RedisCluster.pipeline``)
groups the commands by node, one round trip per node, sent to all nodes before reading.
``kvcache.blockstore`` does this; ``tests/kvcache/test_blockstore.py`` runs it on a real
3-shard cluster.

Example::

    >>> ns = TierNamespace(model="m", block_size=16)
    >>> value = encode_block(ns, b"\\x01" * 32, b"kv")
    >>> decode_block(ns, b"\\x01" * 32, value)
    b'kv'
    >>> decode_block(ns, b"\\x02" * 32, value) is None
    True
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields

import xxhash

__all__ = [
    "FLAG_SIZE_ONLY",
    "HEADER",
    "KEY_VERSION",
    "MAGIC",
    "RESIDENCY_HASH_ALGO",
    "RESIDENCY_LAYOUT",
    "VERSION",
    "BlockHeader",
    "Buffer",
    "TierNamespace",
    "block_header",
    "block_key",
    "decode_block",
    "decode_view",
    "encode_block",
    "hash_bytes",
    "read_header",
    "residency_namespace",
]

MAGIC = b"SYKV"
VERSION = 1
FLAG_SIZE_ONLY = 0x01
_HEADER = struct.Struct("<4sBBHQQQQQ")
HEADER = _HEADER.size  # 48
KEY_VERSION = "kv1"
RESIDENCY_LAYOUT = "residency"
RESIDENCY_HASH_ALGO = "switchyard-xxh3-64"

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class TierNamespace:
    """What makes KV blocks compatible; its digest prefixes every key and sits in every header.

    Example: ``TierNamespace(model="HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16",
    kv_cache_dtype="auto", block_size=128, layout="cpu-hnd", hash_algo="sha256")``.
    """

    model: str
    revision: str = ""
    dtype: str = ""
    kv_cache_dtype: str = ""
    block_size: int = 16
    tp_rank: int = 0
    tp_size: int = 1
    layout: str = ""
    hash_algo: str = ""

    _digest: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError("need 0 <= tp_rank < tp_size")
        object.__setattr__(self, "_digest", xxhash.xxh64_intdigest(self.canonical()))

    def canonical(self) -> bytes:
        """The stable serialisation the digest covers (sorted JSON of every field)."""
        values = {name: getattr(self, name) for name in _NS_FIELDS}
        return json.dumps(values, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> int:
        """xxh64 of :meth:`canonical` (computed once, at construction)."""
        return self._digest

    @property
    def prefix(self) -> bytes:
        """``b"kv1:<16 hex digits>:"``, the start of every key in this namespace."""
        return f"{KEY_VERSION}:{self._digest:016x}:".encode()


_NS_FIELDS = tuple(f.name for f in fields(TierNamespace) if f.init)  # not the cached digest


def residency_namespace(model: str, block_size: int) -> TierNamespace:
    """The namespace of residency keys: gateway block hashes (:mod:`kvcache.hashing`).

    vLLM keys blocks by its own chained hash (SHA-256 over token ids, seeded by
    ``PYTHONHASHSEED``), which the gateway cannot compute. So a writer that stored a block's
    bytes also writes a size-only value under ``block_key(residency_namespace(served model,
    block size), h)`` for ``h`` in ``kvcache.hash_token_blocks(prompt_token_ids, block_size,
    model=served model, adapter=LoRA name)`` -- the gateway's token-mode hashes -- and the
    gateway looks those up with one pipelined EXISTS.
    """
    return TierNamespace(
        model=model, block_size=block_size, layout=RESIDENCY_LAYOUT, hash_algo=RESIDENCY_HASH_ALGO
    )


def hash_bytes(block_hash: bytes | int) -> bytes:
    """Canonical bytes of a block hash: bytes as given; an int as 8 big-endian bytes (or more)."""
    if isinstance(block_hash, bytes):
        return block_hash
    if block_hash < 0:
        raise ValueError("block hash must be non-negative")
    return block_hash.to_bytes(max(8, (block_hash.bit_length() + 7) // 8), "big")


def block_key(ns: TierNamespace, block_hash: bytes | int, *, prefix: bytes | None = None) -> bytes:
    """``prefix + hex(hash)``; pass ``prefix=ns.prefix`` when building many keys in a loop."""
    return (prefix if prefix is not None else ns.prefix) + hash_bytes(block_hash).hex().encode()


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """A value's header, after the namespace, hash and length checks passed."""

    flags: int
    payload_len: int
    nbytes: int
    checksum: int

    @property
    def size_only(self) -> bool:
        return bool(self.flags & FLAG_SIZE_ONLY)


def block_header(
    ns: TierNamespace,
    block_hash: bytes | int,
    payload: Buffer,
    *,
    nbytes: int | None = None,
) -> bytes:
    """The 48-byte header of ``payload``'s value (send it and the payload without joining)."""
    size_only = nbytes is not None and not len(payload)
    if nbytes is not None and len(payload) and nbytes != len(payload):
        raise ValueError("nbytes must equal len(payload) unless the payload is empty")
    if nbytes is not None and nbytes < 0:
        raise ValueError("nbytes must be non-negative")
    return _HEADER.pack(
        MAGIC,
        VERSION,
        FLAG_SIZE_ONLY if size_only else 0,
        0,
        ns.digest,
        xxhash.xxh64_intdigest(hash_bytes(block_hash)),
        len(payload),
        nbytes if nbytes is not None else len(payload),
        xxhash.xxh3_64_intdigest(payload),
    )


def encode_block(
    ns: TierNamespace,
    block_hash: bytes | int,
    payload: bytes,
    *,
    nbytes: int | None = None,
) -> bytes:
    """Header + payload. ``payload=b""`` with ``nbytes=N`` writes a size-only value."""
    return block_header(ns, block_hash, payload, nbytes=nbytes) + payload


def read_header(
    ns: TierNamespace, block_hash: bytes | int, value: Buffer | None
) -> BlockHeader | None:
    """The header when magic, version, namespace, hash and length match, else ``None``.

    The payload checksum is not verified here (:func:`decode_block` does it).
    """
    if value is None or len(value) < HEADER:
        return None
    magic, version, flags, _, ns_d, hash_d, plen, nbytes, checksum = _HEADER.unpack_from(value)
    if magic != MAGIC or version != VERSION:
        return None
    if ns_d != ns.digest:
        return None
    if hash_d != xxhash.xxh64_intdigest(hash_bytes(block_hash)):
        return None
    if plen != len(value) - HEADER:
        return None
    if flags & FLAG_SIZE_ONLY:
        if plen != 0:
            return None
    elif nbytes != plen:
        return None
    return BlockHeader(flags=flags, payload_len=plen, nbytes=nbytes, checksum=checksum)


def decode_block(ns: TierNamespace, block_hash: bytes | int, value: Buffer | None) -> bytes | None:
    """The payload, or ``None`` on any mismatch, a bad checksum, or a size-only value.

    ``value`` may be any buffer (the store decodes straight from its receive buffer); the
    payload returned is always a new ``bytes``.
    """
    view = decode_view(ns, block_hash, value)
    return None if view is None else view.tobytes()


def decode_view(
    ns: TierNamespace, block_hash: bytes | int, value: Buffer | None
) -> memoryview | None:
    """:func:`decode_block` without the copy: a view of the payload inside ``value``."""
    header = read_header(ns, block_hash, value)
    if header is None or header.size_only:
        return None
    assert value is not None
    view = memoryview(value)[HEADER:]
    if xxhash.xxh3_64_intdigest(view) != header.checksum:
        return None
    return view
