"""Decode vLLM KV-cache events from one ZMQ multipart message into typed values (pure).

Wire format (vllm-contract.md §7, ``vllm/distributed/kv_events.py``): a PUB multipart message
``(topic, 8-byte big-endian sequence number, msgpack payload)``. The payload is an
``EventBatch`` encoded by msgspec with ``array_like=True``: ``[ts, [event, ...], dp_rank]``,
each event a tagged array whose first element is the class name::

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
     lora_name, extra_keys, group_idx, ...]
    ["BlockRemoved", block_hashes, medium, ...]
    ["AllBlocksCleared"]

``omit_defaults`` may drop trailing fields, and newer vLLM appends fields, so decoding is
positional and tolerant at the tail. The named-field (map) form some simulators emit
(``{"type": "BlockStored", "block_hashes": ...}``) is accepted too. Block hashes are bytes
(SHA-256 digests) or ints (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``); they are kept opaque,
because they are not comparable across engine processes (see :mod:`kvcache.hashing`).

The socket loop (SUB, reconnects, replay) lives in the gateway; this module only decodes.

Example::

    batch = decode_kv_event_message([b"kv@e1", seq_bytes, payload])
    for event in batch.events: ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EngineBlockHash",
    "KVEvent",
    "KVEventBatch",
    "KVEventDecodeError",
    "decode_kv_event_message",
    "decode_kv_event_payload",
]

EngineBlockHash = int | bytes
"""An engine's own block hash: opaque, only meaningful within that engine process."""


class KVEventDecodeError(ValueError):
    """The message is not a well-formed vLLM KV-event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks cached by the engine; ``token_ids`` holds ``block_size`` tokens per block."""

    block_hashes: tuple[EngineBlockHash, ...]
    parent_block_hash: EngineBlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks evicted by the engine."""

    block_hashes: tuple[EngineBlockHash, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine reset its whole prefix cache."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """One published batch. ``seq`` is the publisher's sequence number (gaps = lost batches)."""

    topic: str
    seq: int
    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None


def _hash(value: Any) -> EngineBlockHash:
    if isinstance(value, bool) or not isinstance(value, int | bytes):
        raise KVEventDecodeError(f"block hash must be int or bytes, got {type(value).__name__}")
    out: EngineBlockHash = value
    return out


def _hashes(value: Any) -> tuple[EngineBlockHash, ...]:
    if not isinstance(value, list | tuple):
        raise KVEventDecodeError("block_hashes must be a list")
    return tuple(_hash(v) for v in value)


def _opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise KVEventDecodeError("expected a string or nil")


def _stored(fields: Mapping[str, Any]) -> BlockStored:
    tokens = fields.get("token_ids", [])
    block_size = fields.get("block_size")
    if not isinstance(tokens, list | tuple) or not all(isinstance(t, int) for t in tokens):
        raise KVEventDecodeError("token_ids must be a list of ints")
    if not isinstance(block_size, int) or block_size <= 0:
        raise KVEventDecodeError("block_size must be a positive int")
    parent = fields.get("parent_block_hash")
    return BlockStored(
        block_hashes=_hashes(fields.get("block_hashes", [])),
        parent_block_hash=None if parent is None else _hash(parent),
        token_ids=tuple(tokens),
        block_size=block_size,
        lora_name=_opt_str(fields.get("lora_name")),
        medium=_opt_str(fields.get("medium")),
    )


_STORED_FIELDS: tuple[str, ...] = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
)
_REMOVED_FIELDS = ("block_hashes", "medium")


def _event(raw: Any) -> KVEvent:
    if isinstance(raw, Mapping):
        tag = raw.get("type", raw.get("tag"))
        fields: Mapping[str, Any] = raw
    elif isinstance(raw, list | tuple) and raw:
        tag = raw[0]
        names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise KVEventDecodeError("event must be a tagged array or a map")
    if tag == "BlockStored":
        return _stored(fields)
    if tag == "BlockRemoved":
        return BlockRemoved(
            block_hashes=_hashes(fields.get("block_hashes", [])),
            medium=_opt_str(fields.get("medium")),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise KVEventDecodeError(f"unknown event type {tag!r}")


def decode_kv_event_payload(payload: bytes, *, topic: str = "", seq: int = -1) -> KVEventBatch:
    """Decode the msgpack ``EventBatch`` part alone."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise KVEventDecodeError(f"bad msgpack: {exc}") from exc
    if isinstance(raw, Mapping):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list | tuple) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise KVEventDecodeError("payload must be [ts, events, rank?] or a map")
    if not isinstance(ts, int | float) or not isinstance(events, list | tuple):
        raise KVEventDecodeError("payload needs a numeric ts and an events list")
    if rank is not None and not isinstance(rank, int):
        raise KVEventDecodeError("data_parallel_rank must be an int or nil")
    return KVEventBatch(
        topic=topic,
        seq=seq,
        ts=float(ts),
        events=tuple(_event(e) for e in events),
        data_parallel_rank=rank,
    )


def decode_kv_event_message(frames: Sequence[bytes]) -> KVEventBatch:
    """Decode ``(topic, seq, payload)`` frames as received from a ZMQ SUB socket."""
    if len(frames) != 3:
        raise KVEventDecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise KVEventDecodeError("sequence frame must be 8 bytes")
    return decode_kv_event_payload(
        payload,
        topic=topic.decode("utf-8", errors="replace"),
        seq=int.from_bytes(seq, "big", signed=True),
    )
