"""The wire format of the shared routing state (:mod:`gateway.sharedstate`): the one Lua
script a sync runs, and the packing of what replicas exchange. Pure, table-tested.

* a replica's per-engine counts (the load hash, one field per replica): msgpack
  ``{engine: [in_flight, in_flight_tokens, prefill_tokens]}``, idle engines left out;
* one stream entry per sync (``r`` = replica id, ``b`` = :class:`Batch`): msgpack
  ``{"p": [[engine, hashes]], "v": {user: cost}}``, empty parts left out; block hashes
  are unsigned 64-bit xxh3 values packed little-endian;
* a replica's cumulative arrivals (the arrivals hash, one field per replica, only from
  replicas that count them: autoscaling enabled): msgpack
  ``{model: [requests, prompt_tokens, output_tokens]}`` since the replica started.

Example::

    prefixes, taken = pack_prefixes([("e0", (11, 12, 13))])
    unpack_batch(pack_batch(prefixes, {"alice": 120.0})).prefixes
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from autoscale.arrivals import ArrivalTotals

__all__ = [
    "MAX_PUBLISH_BYTES",
    "MAX_RECORD_HASHES",
    "NO_LOAD",
    "SYNC_LUA",
    "Batch",
    "Load",
    "SyncReply",
    "pack_arrivals",
    "pack_batch",
    "pack_loads",
    "pack_prefixes",
    "parse_reply",
    "sum_loads",
    "unpack_arrivals",
    "unpack_batch",
    "unpack_loads",
]

MAX_RECORD_HASHES = 1024
"""Blocks published per record: 64 KiB of prompt bytes, or 16k tokens, 8 KiB packed."""
MAX_PUBLISH_BYTES = 256 * 1024
"""Packed prefix records published by one sync (the rest wait for the next)."""

Load = tuple[int, int, int]
"""``(in_flight, in_flight_tokens, prefill_tokens)`` of one replica on one engine."""
NO_LOAD: Load = (0, 0, 0)

# KEYS: replicas zset, load hash, events stream, arrivals hash.
# ARGV: replica id, load blob, liveness ms, last id ('' = first sync: the newest entries),
#       read count, stream maxlen, stream ttl ms, batch blob ('' = nothing new), read bytes,
#       arrivals blob ('' = this replica counts none: nothing written, nothing read).
# Returns: {server ms, live replicas, last id, {replica, load blob, ...},
#           {batch blob, ...} of the other replicas' entries, in stream order,
#           {replica, arrivals blob, ...} of the live replicas}.
SYNC_LUA = """
local rid = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live_ms = tonumber(ARGV[3])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - live_ms))
for _, member in ipairs(dead) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
  redis.call('HDEL', KEYS[4], member)
end
redis.call('ZADD', KEYS[1], now, rid)
redis.call('PEXPIRE', KEYS[1], live_ms * 2)
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[2], rid)
else
  redis.call('HSET', KEYS[2], rid, ARGV[2])
  redis.call('PEXPIRE', KEYS[2], live_ms * 2)
end
local loads = redis.call('HGETALL', KEYS[2])
local count = tonumber(ARGV[5])
local budget = tonumber(ARGV[9])
local last = ARGV[4]
local entries
if last == '' then
  local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', count)
  entries = {}
  for i = #newest, 1, -1 do entries[#entries + 1] = newest[i] end
else
  entries = redis.call('XRANGE', KEYS[3], '(' .. last, '+', 'COUNT', count)
end
local out = {}
local used = 0
local complete = #entries < count
for i, entry in ipairs(entries) do
  last = entry[1]
  local fields = entry[2]
  local from, batch = '', ''
  for j = 1, #fields, 2 do
    if fields[j] == 'r' then from = fields[j + 1]
    elseif fields[j] == 'b' then batch = fields[j + 1] end
  end
  if from ~= rid then
    out[#out + 1] = batch
    used = used + #batch
  end
  if used >= budget and i < #entries then
    complete = false
    break
  end
end
if ARGV[8] ~= '' then
  local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'r', rid, 'b', ARGV[8])
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
  if complete then last = id end
end
if last == '' then last = '0-0' end
local arrivals = {}
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[4], rid, ARGV[10])
  redis.call('PEXPIRE', KEYS[4], live_ms * 2)
  arrivals = redis.call('HGETALL', KEYS[4])
end
return {now, redis.call('ZCARD', KEYS[1]), last, loads, out, arrivals}
"""


def _hash_bytes(hashes: Sequence[int]) -> bytes:
    packed = array("Q", hashes)
    if sys.byteorder == "big":  # pragma: no cover - the wire format is little-endian
        packed.byteswap()
    return packed.tobytes()


def _hashes(data: bytes) -> list[int]:
    if len(data) % 8:
        raise ValueError("packed hashes must be a multiple of 8 bytes")
    packed = array("Q")
    packed.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tolist()


def pack_prefixes(
    records: Iterable[tuple[str, Sequence[int]]],
    *,
    max_hashes: int = MAX_RECORD_HASHES,
    max_bytes: int = MAX_PUBLISH_BYTES,
) -> tuple[list[tuple[str, bytes]], int]:
    """``(packed records, records consumed)``: duplicates dropped, each chain cut to
    ``max_hashes`` blocks (its head), packing stops before ``max_bytes`` of hashes (at
    least one record). The count includes dropped duplicates and empty chains, so the
    caller consumes that many from its outbox."""
    out: list[tuple[str, bytes]] = []
    seen: set[tuple[str, bytes]] = set()
    size = 0
    taken = 0
    for endpoint, hashes in records:
        if not hashes:
            taken += 1
            continue
        packed = _hash_bytes(hashes[:max_hashes])
        if out and size + len(packed) > max_bytes:
            break
        taken += 1
        if (endpoint, packed) in seen:
            continue
        seen.add((endpoint, packed))
        out.append((endpoint, packed))
        size += len(packed)
    return out, taken


@dataclass(frozen=True, slots=True)
class Batch:
    """What one replica publishes per sync: prefix records (engine, chained block hashes)
    and VTC charges per user."""

    prefixes: tuple[tuple[str, list[int]], ...] = ()
    charges: Mapping[str, float] = field(default_factory=dict)


def pack_batch(prefixes: Sequence[tuple[str, bytes]], charges: Mapping[str, float]) -> bytes:
    """One stream entry's payload (msgpack; ``b""`` when there is nothing to publish)."""
    doc: dict[str, Any] = {}
    if prefixes:
        doc["p"] = [list(item) for item in prefixes]
    if charges:
        doc["v"] = dict(charges)
    return msgpack.packb(doc) if doc else b""


def unpack_batch(blob: bytes) -> Batch:
    """The payload of :func:`pack_batch` (ValueError on anything else)."""
    if not blob:
        return Batch()
    doc = _unpack_map(blob, "batch")
    prefixes: list[tuple[str, list[int]]] = []
    for item in _of(doc, "p", list):
        if not (isinstance(item, list) and len(item) == 2):
            raise ValueError("bad prefix record")
        endpoint, data = item
        if not isinstance(endpoint, str) or not isinstance(data, bytes):
            raise ValueError("bad prefix record")
        prefixes.append((endpoint, _hashes(data)))
    charges: dict[str, float] = {}
    for user, cost in _of(doc, "v", dict).items():
        if not isinstance(user, str) or not isinstance(cost, int | float) or cost < 0:
            raise ValueError("bad charge")
        charges[user] = float(cost)
    return Batch(tuple(prefixes), charges)


def _unpack_map(blob: bytes, what: str) -> dict[Any, Any]:
    """A msgpack map (ValueError naming ``what`` on anything else)."""
    try:
        doc = msgpack.unpackb(blob)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"bad {what}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"bad {what}: not a map")
    return doc


def _unpack_counts(blob: bytes, what: str) -> dict[str, list[int]]:
    """A msgpack map of names to three counts, as :func:`pack_loads` and
    :func:`pack_arrivals` write them (ValueError naming ``what`` on anything else)."""
    doc = _unpack_map(blob, f"{what} blob")
    for key, value in doc.items():
        if not (isinstance(key, str) and _counts(value, 3)):
            raise ValueError(f"bad {what} entry")
    return doc


def _of(doc: dict[Any, Any], key: str, kind: type) -> Any:
    value = doc.get(key, kind())
    if not isinstance(value, kind):
        raise ValueError(f"bad batch: {key!r} is not a {kind.__name__}")
    return value


def _counts(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def pack_loads(loads: Mapping[str, Load]) -> bytes:
    """One replica's per-engine counts (engines at zero left out; ``b""``: none)."""
    busy = {eid: list(load) for eid, load in loads.items() if load != NO_LOAD}
    return msgpack.packb(busy) if busy else b""


def unpack_loads(blob: bytes) -> dict[str, Load]:
    if not blob:
        return {}
    return {eid: (v[0], v[1], v[2]) for eid, v in _unpack_counts(blob, "load").items()}


def sum_loads(replicas: Iterable[Mapping[str, Load]]) -> dict[str, Load]:
    """Per engine, the sum over replicas."""
    out: dict[str, Load] = {}
    for loads in replicas:
        for eid, (n, tokens, prefill) in loads.items():
            a, b, c = out.get(eid, NO_LOAD)
            out[eid] = (a + n, b + tokens, c + prefill)
    return out


def pack_arrivals(by_model: Mapping[str, ArrivalTotals]) -> bytes:
    """One replica's cumulative arrivals per model (never ``b""``: an empty map is a replica
    that counts arrivals but has seen none)."""
    doc = {m: [t.requests, t.prompt_tokens, t.output_tokens] for m, t in by_model.items()}
    return bytes(msgpack.packb(doc))


def unpack_arrivals(blob: bytes) -> dict[str, ArrivalTotals]:
    """The payload of :func:`pack_arrivals` (ValueError on anything else)."""
    counts = _unpack_counts(blob, "arrivals")
    return {model: ArrivalTotals(v[0], v[1], v[2]) for model, v in counts.items()}


@dataclass(frozen=True, slots=True)
class SyncReply:
    """The script's answer: live replicas, the stream id read up to, the other live
    replicas' counts by replica id, the other replicas' batches in stream order, and the
    other live replicas' arrivals blobs by replica id."""

    server_ms: int
    replicas: int
    last_id: str
    loads: dict[str, bytes]
    entries: list[bytes]
    arrivals: dict[str, bytes] = field(default_factory=dict)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _blob(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def parse_reply(raw: Any, *, replica_id: str) -> SyncReply:
    """:data:`SYNC_LUA`'s reply (the arrivals part may be absent); this replica's own load
    and arrivals are left out. ValueError if malformed."""
    if not (isinstance(raw, list | tuple) and len(raw) in (5, 6)):
        raise ValueError("unexpected sync reply")
    now, replicas, last, loads, entries = raw[:5]
    arrivals = raw[5] if len(raw) == 6 else ()
    if not isinstance(entries, list | tuple):
        raise ValueError("unexpected sync reply")
    batches = [_blob(entry) for entry in entries]
    return SyncReply(
        int(now),
        max(1, int(replicas)),
        _text(last),
        _others(loads, replica_id),
        batches,
        _others(arrivals, replica_id),
    )


def _others(pairs: Any, replica_id: str) -> dict[str, bytes]:
    """A flat HGETALL reply by replica id, less ``replica_id``'s own field."""
    if not isinstance(pairs, list | tuple) or len(pairs) % 2:
        raise ValueError("unexpected sync reply")
    return {
        _text(pairs[i]): _blob(pairs[i + 1])
        for i in range(0, len(pairs), 2)
        if _text(pairs[i]) != replica_id
    }
