"""Replicas share their routing state through Redis: one round trip per sync, none per request.

Gateway replicas (separate processes, or the workers of ``switchyard serve --workers N``)
each route on local state -- in-flight counts per engine (:mod:`routing.state`), the
approximate prefix index (:class:`kvcache.PrefixIndex`) and the VTC fairness counters
(:mod:`routing.fairness`). Without sharing, each replica would see only its own load (N
replicas pile onto the engine each thinks idle) and place each prefix group on its own (up
to N cold placements per group). :class:`SharedRoutingState` keeps them in step:

* **the hot path stays local**: a request reads only local state; ``Routed.committed``
  appends ``(engine, block hashes)`` to a bounded deque (``Router.outbox``) and charges are
  summed in memory (``VirtualTokenCounters.track_charges``);
* **a background sync** every ``redis.sync_interval_s`` (default 0.05 s) runs one Lua script
  (:data:`SYNC_LUA`, one round trip, atomic) that writes this replica's heartbeat (ZSET
  ``<prefix>rs:replicas``, scored with Redis server time, so no clock skew between hosts)
  and its per-engine counts (hash ``<prefix>rs:load``, a field per live replica), drops
  replicas silent for ``liveness`` = max(1 s, 5 intervals), reads the other live replicas'
  counts, appends this replica's new prefix records and VTC charges to the stream
  ``<prefix>rs:events`` (one entry per sync, ``XADD MAXLEN ~``) and reads the other
  replicas' entries since its last id.
* **applied locally**: the other replicas' counts are summed per engine and replace
  ``EngineState``'s remote counts wholesale (snapshots add them); their prefix records are
  inserted into the local index as approximate entries (the same as its own commits); their
  charges are added to the local VTC counters (each replica keeps its own lifts).

**Staleness**: a replica sees another's state as of that replica's last sync, fetched by its
own next sync: between 0 and 2 intervals plus one round trip old (about one interval, 50 ms,
on average). A prefix group's second request reaching another replica within that window
is placed without knowing the first (a second cold placement); in-flight counts lag the
same way. Engine ids come from the config and must be equal across replicas (records for
engines a replica does not know are ignored).

**Bounds**: the outbox keeps the newest :data:`OUTBOX_RECORDS` records; a chain is cut to
its first :data:`MAX_RECORD_HASHES` blocks (a prefix of a chain is a chain); one sync
publishes at most :data:`MAX_PUBLISH_BYTES` and reads at most :data:`READ_COUNT` entries or
:data:`MAX_READ_BYTES` (a replica that fell behind catches up over several syncs; one that
fell behind the stream's :data:`STREAM_MAXLEN` entries loses the trimmed ones -- the index is
approximate); the load hash holds one field per live replica; every key has a TTL, so a
fleet that stops leaves nothing behind. VTC: each user's service on other replicas reaches
this replica's counter within the staleness above, unless trimmed unread; charges made
while Redis is down are published when it is back (at most ``max_users`` users).

**Redis down** (:meth:`RedisLink.call` returns None): the replica serves on local state;
after ``liveness`` without a good sync the remote counts are cleared (a vanished replica's
load must not stick), :meth:`SharedRoutingState.replicas` keeps the last known count; the
sync resumes when the link's probe closes the breaker.

Example::

    shared = SharedRoutingState(link, endpoints=endpoints, router=router, settings=settings,
                                registry=metrics.registry)
    tg.start_soon(supervise, "shared-state", shared.run)
    shared.replicas()  # live gateway replicas sharing this Redis (>= 1)
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgpack
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis

from gateway.endpoints import EndpointRegistry
from gateway.redislink import RedisLink
from gateway.router import Router
from gateway.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "Load",
    "SharedRoutingState",
    "SyncReply",
    "pack_charges",
    "pack_loads",
    "pack_prefixes",
    "parse_reply",
    "sum_loads",
    "unpack_charges",
    "unpack_loads",
    "unpack_prefixes",
]

OUTBOX_RECORDS = 4096
"""Prefix records kept for the next sync (the oldest are dropped beyond it)."""
MAX_RECORD_HASHES = 1024
"""Blocks published per record: 64 KiB of prompt bytes, or 16k tokens, 8 KiB packed."""
MAX_PUBLISH_BYTES = 256 * 1024
"""Packed prefix records published by one sync (the rest wait for the next)."""
READ_COUNT = 64
"""Stream entries one sync reads at most (each one replica's sync)."""
MAX_READ_BYTES = 512 * 1024
"""Payload bytes one sync reads at most (bounds the inserts one sync does on the loop)."""
STREAM_MAXLEN = 512
"""``XADD MAXLEN ~``: entries kept (Redis trims whole nodes, so slightly more)."""
STREAM_TTL_S = 120.0
"""The stream expires this long after the last entry (a stopped fleet leaves nothing)."""

Load = tuple[int, int, int]
"""``(in_flight, in_flight_tokens, prefill_tokens)`` of one replica on one engine."""
_NO_LOAD: Load = (0, 0, 0)

# KEYS: replicas zset, load hash, events stream.
# ARGV: replica id, load blob, liveness ms, last id ('' = first sync: the newest entries),
#       read count, stream maxlen, stream ttl ms, prefix blob, charges blob, read bytes.
# Returns: {server ms, live replicas, last id, {replica, load blob, ...},
#           {prefix blob, charges blob, ...} of the other replicas' entries}.
SYNC_LUA = """
local rid = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live_ms = tonumber(ARGV[3])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - live_ms))
for _, member in ipairs(dead) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
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
local budget = tonumber(ARGV[10])
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
  local from, p, v = '', '', ''
  for j = 1, #fields, 2 do
    local name = fields[j]
    if name == 'r' then from = fields[j + 1]
    elseif name == 'p' then p = fields[j + 1]
    elseif name == 'v' then v = fields[j + 1] end
  end
  if from ~= rid then
    out[#out + 1] = p
    out[#out + 1] = v
    used = used + #p + #v
  end
  if used >= budget and i < #entries then
    complete = false
    break
  end
end
if ARGV[8] ~= '' or ARGV[9] ~= '' then
  local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
                        'r', rid, 'p', ARGV[8], 'v', ARGV[9])
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
  if complete then last = id end
end
if last == '' then last = '0-0' end
return {now, redis.call('ZCARD', KEYS[1]), last, loads, out}
"""


# -- pure helpers (table-tested) ---------------------------------------------------------
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
) -> tuple[bytes, int]:
    """``(blob, records packed)``: duplicates dropped, each chain cut to ``max_hashes``
    blocks (its head), packing stops before ``max_bytes`` of hashes (at least one record);
    ``b""`` when there is nothing. The count includes dropped duplicates, so the caller
    consumes that many from its outbox."""
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
    return (msgpack.packb(out) if out else b""), taken


def unpack_prefixes(blob: bytes) -> list[tuple[str, list[int]]]:
    """The records of :func:`pack_prefixes` (ValueError on anything else)."""
    if not blob:
        return []
    try:
        items = msgpack.unpackb(blob)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"bad prefix records: {exc}") from exc
    if not isinstance(items, list):
        raise ValueError("bad prefix records: not a list")
    out: list[tuple[str, list[int]]] = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2):
            raise ValueError("bad prefix record")
        endpoint, data = item
        if not isinstance(endpoint, str) or not isinstance(data, bytes):
            raise ValueError("bad prefix record")
        out.append((endpoint, _hashes(data)))
    return out


def pack_loads(loads: Mapping[str, Load]) -> bytes:
    """One replica's per-engine counts (engines at zero left out; ``b""``: none)."""
    busy = {eid: list(load) for eid, load in loads.items() if load != _NO_LOAD}
    return msgpack.packb(busy) if busy else b""


def unpack_loads(blob: bytes) -> dict[str, Load]:
    if not blob:
        return {}
    try:
        raw = msgpack.unpackb(blob)
    except Exception as exc:
        raise ValueError(f"bad load blob: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("bad load blob: not a map")
    out: dict[str, Load] = {}
    for eid, value in raw.items():
        if not (
            isinstance(eid, str)
            and isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, int) for v in value)
        ):
            raise ValueError("bad load entry")
        out[eid] = (value[0], value[1], value[2])
    return out


def sum_loads(replicas: Iterable[Mapping[str, Load]]) -> dict[str, Load]:
    """Per engine, the sum over replicas (negative counts, a bug elsewhere, count as 0)."""
    out: dict[str, Load] = {}
    for loads in replicas:
        for eid, (n, tokens, prefill) in loads.items():
            a, b, c = out.get(eid, _NO_LOAD)
            out[eid] = (a + max(0, n), b + max(0, tokens), c + max(0, prefill))
    return out


def pack_charges(charges: Mapping[str, float]) -> bytes:
    return msgpack.packb(dict(charges)) if charges else b""


def unpack_charges(blob: bytes) -> dict[str, float]:
    if not blob:
        return {}
    try:
        raw = msgpack.unpackb(blob)
    except Exception as exc:
        raise ValueError(f"bad charges: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("bad charges: not a map")
    out: dict[str, float] = {}
    for user, cost in raw.items():
        if not isinstance(user, str) or not isinstance(cost, int | float) or cost < 0:
            raise ValueError("bad charge")
        out[user] = float(cost)
    return out


@dataclass(frozen=True, slots=True)
class SyncReply:
    """The script's answer: live replicas, the stream id read up to, the other live
    replicas' counts by replica id, and the other replicas' ``(prefix blob, charges blob)``
    entries in stream order."""

    server_ms: int
    replicas: int
    last_id: str
    loads: dict[str, bytes]
    entries: list[tuple[bytes, bytes]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _blob(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def parse_reply(raw: Any, *, replica_id: str) -> SyncReply:
    """:data:`SYNC_LUA`'s reply; this replica's own load is left out. ValueError if
    malformed."""
    if not (isinstance(raw, list | tuple) and len(raw) == 5):
        raise ValueError("unexpected sync reply")
    now, replicas, last, loads, entries = raw
    if not isinstance(loads, list | tuple) or not isinstance(entries, list | tuple):
        raise ValueError("unexpected sync reply")
    if len(loads) % 2 or len(entries) % 2:
        raise ValueError("unexpected sync reply")
    others = {
        _text(loads[i]): _blob(loads[i + 1])
        for i in range(0, len(loads), 2)
        if _text(loads[i]) != replica_id
    }
    pairs = [(_blob(entries[i]), _blob(entries[i + 1])) for i in range(0, len(entries), 2)]
    return SyncReply(int(now), max(1, int(replicas)), _text(last), others, pairs)


def new_replica_id() -> str:
    """Random per process (a restarted worker is a new replica), with the pid to read logs."""
    return f"{secrets.token_hex(6)}-{os.getpid()}"


# -- the sync loop ----------------------------------------------------------------------
class SharedRoutingState:
    """This replica's side of the shared routing state (see the module docstring)."""

    def __init__(
        self,
        link: RedisLink,
        *,
        endpoints: EndpointRegistry,
        router: Router,
        settings: Settings,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
        replica_id: str | None = None,
    ) -> None:
        self.link = link
        self.endpoints = endpoints
        self.router = router
        self.replica_id = replica_id or new_replica_id()
        self.interval_s = settings.redis.sync_interval_s
        self.liveness_s = max(1.0, 5 * self.interval_s)
        self._clock = clock
        self._keys = [link.key("rs", "replicas"), link.key("rs", "load"), link.key("rs", "events")]
        self._script: Any = None  # redis-py AsyncScript, made on the serving loop
        self._last_id = ""
        self._last_ok: float | None = None
        self._remote_set = False
        self._replicas = settings.limits.replicas
        self._charges: dict[str, float] = {}
        self.outbox: deque[tuple[str, tuple[int, ...]]] = deque(maxlen=OUTBOX_RECORDS)
        router.outbox = self.outbox
        router.vtc.track_charges()
        self.sync_seconds = Histogram(
            "switchyard_shared_state_sync_seconds",
            "One shared-routing-state sync with Redis (round trip and applying it)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self.replicas_gauge = Gauge(
            "switchyard_shared_state_replicas",
            "Live gateway replicas sharing routing state (last known while Redis is down)",
            registry=registry,
        )
        self.replicas_gauge.set(self._replicas)
        self.sync_errors = Counter(
            "switchyard_shared_state_sync_errors_total",
            "Syncs that failed (Redis down or timed out, or a malformed reply)",
            registry=registry,
        )
        self.prefix_records = Counter(
            "switchyard_shared_state_prefix_records_total",
            "Prefix records exchanged with other replicas",
            ["direction"],
            registry=registry,
        )
        self._sent = self.prefix_records.labels("sent")
        self._received = self.prefix_records.labels("received")

    def replicas(self) -> int:
        """Live gateway replicas sharing this Redis, this one included: as of the last good
        sync (the last known count while Redis is down; ``limits.replicas`` before any)."""
        return self._replicas

    async def run(self) -> None:
        """Background: sync every ``sync_interval_s`` until cancelled."""
        while True:
            started = self._clock()
            await self.sync_once()
            spent = self._clock() - started
            await anyio.sleep(max(self.interval_s - spent, self.interval_s / 10))

    async def sync_once(self) -> bool:
        """One exchange with Redis; False (and local state only) when it failed."""
        if not self.link.up:  # the breaker is open: nothing to pack (its probe reopens it)
            self.sync_errors.inc()
            self._stale()
            return False
        started = time.perf_counter()
        records = list(self.outbox)
        prefix_blob, taken = pack_prefixes(records)
        self._charges_add(self.router.vtc.take_charges())
        charges_blob = pack_charges(self._charges)
        loads = {state.id: state.engine.local_load() for state in self.endpoints}
        args = [
            self.replica_id,
            pack_loads(loads),
            int(self.liveness_s * 1000),
            self._last_id,
            READ_COUNT,
            STREAM_MAXLEN,
            int(STREAM_TTL_S * 1000),
            prefix_blob,
            charges_blob,
            MAX_READ_BYTES,
        ]
        raw = await self.link.call("shared_state", lambda r: self._run_script(r, args))
        reply: SyncReply | None = None
        if raw is not None:
            try:
                reply = parse_reply(raw, replica_id=self.replica_id)
            except (ValueError, TypeError) as exc:
                log.warning("shared routing state: bad sync reply (%s)", exc)
        if reply is None:
            self.sync_errors.inc()
            self._stale()
            return False
        for _ in range(min(taken, len(self.outbox))):
            self.outbox.popleft()
        self._charges = {}
        if prefix_blob:
            self._sent.inc(taken)
        self._apply(reply)
        self._last_ok = self._clock()
        self.sync_seconds.observe(time.perf_counter() - started)
        return True

    async def leave(self) -> None:
        """Deregister (shutdown): the others stop counting this replica at once."""
        replicas, load, _ = self._keys

        async def remove(r: Redis) -> None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zrem(replicas, self.replica_id)
                pipe.hdel(load, self.replica_id)
                await pipe.execute()

        await self.link.call("shared_state_leave", remove)

    def describe(self) -> dict[str, Any]:
        """For ``/ready``: replica id, live replicas, age of the last good sync."""
        age = None if self._last_ok is None else round(self._clock() - self._last_ok, 3)
        return {"replica": self.replica_id, "replicas": self._replicas, "last_sync_age_s": age}

    # -- internals ------------------------------------------------------------------------
    async def _run_script(self, client: Redis, args: list[Any]) -> Any:
        if self._script is None:
            self._script = client.register_script(SYNC_LUA)
        return await self._script(keys=self._keys, args=args)

    def _charges_add(self, charges: Mapping[str, float]) -> None:
        limit = self.router.vtc.max_users
        for user, cost in charges.items():
            if user in self._charges or len(self._charges) < limit:
                self._charges[user] = self._charges.get(user, 0.0) + cost

    def _apply(self, reply: SyncReply) -> None:
        self._last_id = reply.last_id
        self._replicas = reply.replicas
        self.replicas_gauge.set(reply.replicas)
        replica_loads: list[dict[str, Load]] = []
        for rid, blob in reply.loads.items():
            try:
                replica_loads.append(unpack_loads(blob))
            except ValueError as exc:
                log.warning("shared routing state: replica %s sent bad counts (%s)", rid, exc)
        totals = sum_loads(replica_loads)
        for state in self.endpoints:
            n, tokens, prefill = totals.get(state.id, _NO_LOAD)
            state.engine.set_remote(in_flight=n, in_flight_tokens=tokens, prefill_tokens=prefill)
        self._remote_set = bool(totals)
        index, vtc = self.router.index, self.router.vtc
        received = 0
        for prefix_blob, charges_blob in reply.entries:
            try:
                records = unpack_prefixes(prefix_blob)
                charges = unpack_charges(charges_blob)
            except ValueError as exc:
                log.warning("shared routing state: bad stream entry (%s)", exc)
                continue
            for endpoint_id, hashes in records:
                if self.endpoints.get(endpoint_id) is not None:
                    index.insert(endpoint_id, hashes)
                    received += 1
            if charges:
                vtc.add_remote(charges)
        if received:
            self._received.inc(received)

    def _stale(self) -> None:
        """No good sync: after ``liveness`` drop the remote counts (nothing sticks)."""
        if not self._remote_set:
            return
        if self._last_ok is not None and self._clock() - self._last_ok < self.liveness_s:
            return
        for state in self.endpoints:
            state.engine.set_remote()
        self._remote_set = False
