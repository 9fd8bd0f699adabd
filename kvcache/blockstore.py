"""The KV block store: one small protocol, a sync and an async Redis implementation.

Keys and values come from :mod:`kvcache.tier` (one key per block, a checked header). Every
operation is one pipelined round trip for the whole batch:

* ``lookup(ns, hashes) -> int``: EXISTS per key, pipelined; the number of *leading* blocks
  present (a chain is only useful up to its first gap). The async store on one server sends
  the same EXISTS as one script call (:data:`LEADING_LUA`: one command, one integer back,
  stops at the first gap): a quarter of redis-py's client CPU for 64 blocks.
* ``get_many(ns, hashes) -> list[bytes | None]``: GET per key, pipelined (on one server a
  pipeline of GETs and an MGET cost the same round trip; the pipeline also works on a Redis
  Cluster, where MGET across slots does not); each value decoded, a missing, corrupt,
  mismatched or size-only value is ``None``.
* ``put_many(ns, items, ttl_s=...) -> int``: ``SET key value NX EX ttl`` per block,
  pipelined; the first writer wins, the count of values newly written is returned.

**Failures never raise.** Redis down, a timeout or a cluster error make ``lookup`` answer 0
and ``get_many`` all ``None`` (a miss: the caller recomputes), ``put_many`` answer 0; each is
counted. After a failure the store stops calling Redis for ``retry_s`` (a breaker: a dead or
black-holed server costs one timeout per ``retry_s``, not one per request) and counts the
calls it skipped.

**Capacity** is Redis' job: run it with ``maxmemory <bytes>`` and ``maxmemory-policy
allkeys-lru`` so old blocks make room for new ones (every key also carries the TTL given to
``put_many``). A key evicted between ``lookup`` and ``get_many`` comes back ``None``; the
vLLM connector then reports those blocks as load errors and vLLM recomputes them
(``kv_load_failure_policy: recompute``).

**Cluster**: ``redis+cluster://[[user]:password@]h1:p1,h2:p2`` builds a ``RedisCluster``
client (with the URL's user and password); keys carry no hash tag (:mod:`kvcache.tier`), so a
prefix's blocks spread over the shards and the pipelines are split by node (one round trip per
node, all sent before any is read).

**Bounds**: a bounded connection pool (``max_connections``; a caller waits at most
``timeout_s`` for a connection), socket connect/read timeouts of ``timeout_s``, no client
retries (redis-py 6 retries 3 times by default; a retry is the caller's decision). The one
exception: :class:`~kvcache.resp.RespClient` sends a call again, once, when a pooled connection
turns out closed by the server before any reply byte (a Redis restart, an idle timeout).

Example::

    store = RedisBlockStore.from_url("redis://127.0.0.1:6379/0")
    store.put_many(ns, [(h, payload)], ttl_s=3600)
    n = store.lookup(ns, hashes)          # leading blocks present
    blocks = store.get_many(ns, hashes[:n])
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvcache.resp import Arg, Command, Reply, RespClient, RespError
from kvcache.tier import Buffer, TierNamespace, block_header, block_key, decode_view, read_header

__all__ = [
    "LEADING_LUA",
    "REDIS_ERRORS",
    "AsyncBlockStore",
    "AsyncRedisBlockStore",
    "BlockRead",
    "BlockStore",
    "Hash",
    "Item",
    "RedisBlockStore",
    "StoreStats",
    "load_outcome",
]

Hash = bytes | int
Item = tuple[Hash, bytes | int]
"""``(block hash, payload)``; an int payload N writes a size-only value of N bytes."""

LEADING_LUA = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then return i - 1 end
end
return #KEYS
"""
"""How many of KEYS exist before the first absent one (the async store's lookup)."""

REDIS_ERRORS = (redis.RedisError, RedisClusterException, RespError, OSError, TimeoutError)
T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters since the store was made (monotonic, for ``_total`` metrics)."""

    lookups: int = 0  # lookup calls answered by Redis
    lookup_hit_blocks: int = 0  # leading blocks those lookups found
    hits: int = 0  # blocks get_many returned
    misses: int = 0  # blocks get_many was asked for and returned None
    corrupt: int = 0  # of misses: a value was there but failed the header/checksum checks
    # (or read_blocks' sink refused it)
    bytes_fetched: int = 0  # payload bytes get_many returned
    puts: int = 0  # blocks written (SET NX succeeded)
    put_existing: int = 0  # blocks not written: the key existed (the first writer wins)
    bytes_stored: int = 0  # value bytes (header included) written
    errors: int = 0  # calls that failed: lookup/get answered a miss, put wrote nothing
    skipped: int = 0  # calls not sent while the breaker was open after a failure
    declines: int = 0  # loads the caller declined (break-even gate), see record_decline
    declined_blocks: int = 0

    @property
    def failed(self) -> int:
        """Calls that did not do their work: failed (``errors``) or not sent (``skipped``)."""
        return self.errors + self.skipped


class _Counters:
    """Mutable twin of :class:`StoreStats`; one per store."""

    def __init__(self) -> None:
        self.values = dict.fromkeys((f.name for f in fields(StoreStats)), 0)

    def add(self, **deltas: int) -> None:
        for name, delta in deltas.items():
            self.values[name] += delta

    def snapshot(self) -> StoreStats:
        return StoreStats(**self.values)


class BlockRead(enum.Enum):
    """How one block of :meth:`RedisBlockStore.read_blocks` came back."""

    HIT = "hit"  # verified and handed to the sink
    MISS = "miss"  # no value (never written, expired, evicted) or a size-only one
    BAD = "bad"  # a value was read and is unusable: corrupt, mismatched, refused by the sink
    FAILED = "failed"  # not read: Redis failed or timed out, or the breaker skipped the call


def load_outcome(reads: Sequence[BlockRead]) -> tuple[int, list[int]]:
    """``(blocks loaded, indices to delete)`` for a load of a chain of blocks (the vLLM
    connector's): the chain is usable up to its first block that is not a :attr:`~BlockRead.HIT`;
    only values that were read and found :attr:`~BlockRead.BAD` are to be deleted (a bad value
    would fail every later load until its TTL, and ``SET NX`` could never replace it). A miss
    has nothing to delete; a :attr:`~BlockRead.FAILED` block was never read (Redis down, a
    timeout, the breaker open) and may be fine: deleting it would take a valid block from every
    engine sharing the tier. Blocks after the first gap that came back fine stay too."""
    loaded = next((i for i, r in enumerate(reads) if r is not BlockRead.HIT), len(reads))
    return loaded, [i for i in range(loaded, len(reads)) if reads[i] is BlockRead.BAD]


class BlockStore(Protocol):
    """The sync seam (vLLM's connector). An RDMA store (Mooncake, InfiniStore) fits here too."""

    def lookup(self, ns: TierNamespace, hashes: Sequence[Hash]) -> int: ...
    def get_many(self, ns: TierNamespace, hashes: Sequence[Hash]) -> list[bytes | None]: ...
    def put_many(self, ns: TierNamespace, items: Sequence[Item], *, ttl_s: float) -> int: ...
    def record_decline(self, blocks: int) -> None: ...
    def stats(self) -> StoreStats: ...


class AsyncBlockStore(Protocol):
    """The async seam (enginesim, the gateway): the same operations, awaited."""

    async def lookup(self, ns: TierNamespace, hashes: Sequence[Hash]) -> int: ...
    async def get_many(self, ns: TierNamespace, hashes: Sequence[Hash]) -> list[bytes | None]: ...
    async def put_many(self, ns: TierNamespace, items: Sequence[Item], *, ttl_s: float) -> int: ...
    def record_decline(self, blocks: int) -> None: ...
    def record_failure(self) -> None: ...
    def stats(self) -> StoreStats: ...


def _keys(ns: TierNamespace, hashes: Sequence[Hash]) -> list[bytes]:
    prefix = ns.prefix
    return [block_key(ns, h, prefix=prefix) for h in hashes]


def _leading(flags: Sequence[Any]) -> int:
    n = 0
    for flag in flags:
        if not flag:
            break
        n += 1
    return n


def _ttl(ttl_s: float) -> bytes:
    return b"%d" % max(1, round(ttl_s))


def _sets(ns: TierNamespace, items: Sequence[Item], ttl_s: float) -> list[tuple[Arg, ...]]:
    """``SET key (header, payload) NX EX ttl`` per item; the payload is never copied."""
    prefix, ttl = ns.prefix, _ttl(ttl_s)
    out: list[tuple[Arg, ...]] = []
    for h, payload in items:
        body = b"" if isinstance(payload, int) else payload
        nbytes = payload if isinstance(payload, int) else None
        header = block_header(ns, h, body, nbytes=nbytes)
        out.append((b"SET", block_key(ns, h, prefix=prefix), (header, body), b"NX", b"EX", ttl))
    return out


def _size(command: Sequence[Arg]) -> int:
    value = command[2]
    return sum(map(len, value)) if isinstance(value, tuple) else len(value)


def _redispy_args(command: Sequence[Arg]) -> list[str | bytes]:
    """redis-py's form: the command name as ``str`` (its cluster key routing and reply
    callbacks look it up by name), multi-part arguments joined."""
    name, *args = command
    return [_joined(name).decode(), *(_joined(a) for a in args)]


def _joined(arg: Arg) -> bytes:
    return b"".join(arg) if isinstance(arg, tuple) else arg


class _ClusterURL(NamedTuple):
    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None


def _cluster_url(url: str) -> _ClusterURL:
    """``redis+cluster://[[user]:password@]h1[:p1][,h2[:p2]...]``: the startup nodes (port
    6379 by default) and the credentials (percent-decoded; a lone name is a user, as redis-py
    reads a URL; ``None`` when absent). Every client of a cluster URL (both stores, the
    connector's deleter) passes them on as ``username``/``password``: a cluster with
    ``requirepass`` or ACLs refuses a client without them."""
    userinfo, at, hosts = urlsplit(url).netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, _, port = part.rpartition(":")
        nodes.append((host or part, int(port) if port.isdigit() else 6379))
    return _ClusterURL(nodes, username, password)


def _check_pool(max_connections: int) -> None:
    """Refuse a pool that could never lend a connection (every call would wait and fail)."""
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise ValueError(f"max_connections must be an integer, got {max_connections!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {max_connections}")


def _redispy_bounds(timeout_s: float) -> dict[str, Any]:
    """Both stores' redis-py clients: every socket call bounded, no retries (a failure opens
    the breaker instead)."""
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }


class _Decoder:
    """Decodes one batch's values as they arrive and tallies hits, misses and corruption."""

    def __init__(
        self,
        ns: TierNamespace,
        hashes: Sequence[Hash],
        sink: Callable[[int, memoryview], bool | None] | None = None,
    ) -> None:
        self.ns, self.hashes, self.sink = ns, hashes, sink
        self.hits = self.corrupt = self.nbytes = 0
        self.reads = [BlockRead.FAILED] * len(hashes)  # until its reply is read

    def _view(self, i: int, value: Buffer | int | None) -> memoryview | None:
        if value is None or isinstance(value, int):
            return None
        h = self.hashes[i]
        payload = decode_view(self.ns, h, value)
        if payload is not None:
            self.hits += 1
            self.nbytes += len(payload)
        else:
            header = read_header(self.ns, h, value)
            self.corrupt += header is None or not header.size_only  # size-only: plain miss
        return payload

    def __call__(self, i: int, value: Buffer | int | None) -> bytes | None:
        view = self._view(i, value)
        return None if view is None else view.tobytes()

    def deliver(self, i: int, value: Buffer | int | None) -> BlockRead:
        """Hand block ``i`` to the sink if it verifies; its outcome also lands in ``reads``."""
        corrupt = self.corrupt
        view = self._view(i, value)
        if view is None:
            read = BlockRead.BAD if self.corrupt > corrupt else BlockRead.MISS
        else:
            assert self.sink is not None
            read = BlockRead.HIT
            if self.sink(i, view) is False:  # the caller refused it (e.g. not its block size)
                self.hits -= 1
                self.nbytes -= len(view)
                self.corrupt += 1
                read = BlockRead.BAD
        self.reads[i] = read
        return read


class _Core:
    """What both stores share: counters, the breaker, accounting."""

    def __init__(self, retry_s: float, clock: Callable[[], float]) -> None:
        if not retry_s >= 0:  # NaN too
            raise ValueError(f"retry_s must be 0 or more seconds, got {retry_s!r}")
        self._counters = _Counters()
        self._retry_s = retry_s
        self._clock = clock
        self._open_until = float("-inf")

    def _allowed(self) -> bool:
        if self._clock() < self._open_until:
            self._counters.add(skipped=1)
            return False
        return True

    def _failed(self) -> None:
        self._counters.add(errors=1)
        self._open_until = self._clock() + self._retry_s

    def record_failure(self) -> None:
        """Count a call the caller gave up on (its own deadline ran out first): an error,
        and the breaker opens as for any failure, so a hung Redis costs one caller's
        deadline per ``retry_s``, not every caller's."""
        self._failed()

    def _looked_up(self, flags: Sequence[Any]) -> int:
        n = _leading(flags)
        self._counters.add(lookups=1, lookup_hit_blocks=n)
        return n

    def _got(self, decoder: _Decoder, out: list[U]) -> list[U]:
        self._counters.add(
            hits=decoder.hits,
            misses=len(out) - decoder.hits,
            corrupt=decoder.corrupt,
            bytes_fetched=decoder.nbytes,
        )
        return out

    def _missed(self, hashes: Sequence[Hash]) -> list[bytes | None]:
        self._counters.add(misses=len(hashes))
        return [None] * len(hashes)

    def _stored(self, commands: Sequence[Sequence[Arg]], written: Sequence[bool]) -> int:
        n = sum(written)
        size = sum(_size(c) for c, ok in zip(commands, written, strict=True) if ok)
        self._counters.add(puts=n, put_existing=len(written) - n, bytes_stored=size)
        return n

    def record_decline(self, blocks: int) -> None:
        """Count a load the caller declined (e.g. the break-even gate), of ``blocks`` blocks."""
        self._counters.add(declines=1, declined_blocks=blocks)

    def stats(self) -> StoreStats:
        return self._counters.snapshot()


class _RedisPy:
    """redis-py behind :class:`RespClient`'s ``pipeline`` shape (the Redis Cluster path)."""

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        self.client = client

    def pipeline(self, commands: Sequence[Command], handle: Callable[[int, Reply], T]) -> list[T]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*_redispy_args(command))
        results = pipe.execute()
        return [handle(i, _reply(r)) for i, r in enumerate(results)]

    def close(self) -> None:
        self.client.close()


def _reply(result: Any) -> Reply:
    if isinstance(result, bytes):
        return memoryview(result)
    if result is None or isinstance(result, int):  # bool is an int: SET's True
        return result
    raise TypeError(f"unexpected reply {type(result).__name__}")


class RedisBlockStore(_Core):
    """Sync store (inside vLLM's scheduler and worker processes).

    One server: :class:`~kvcache.resp.RespClient` (large values received in place); a
    Redis Cluster (``redis+cluster://``) or any redis-py client passed in: redis-py.

    Example: ``RedisBlockStore.from_url("redis://127.0.0.1:6379/0", timeout_s=0.5)``.
    """

    def __init__(
        self,
        client: RespClient | redis.Redis | RedisCluster,
        *,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(retry_s, clock)
        self._client = client if isinstance(client, RespClient) else _RedisPy(client)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_connections: int = 8,
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> RedisBlockStore:
        _check_pool(max_connections)
        client: RespClient | RedisCluster
        if url.startswith("redis+cluster://"):
            target = _cluster_url(url)
            client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],  # type: ignore[no-untyped-call]
                max_connections=max_connections,
                username=target.username,
                password=target.password,
                **_redispy_bounds(timeout_s),
            )
        else:
            client = RespClient.from_url(url, max_connections=max_connections, timeout_s=timeout_s)
        return cls(client, retry_s=retry_s, clock=clock)

    def close(self) -> None:
        self._client.close()

    def lookup(self, ns: TierNamespace, hashes: Sequence[Hash]) -> int:
        if not hashes or not self._allowed():
            return 0
        try:
            flags = self._client.pipeline([(b"EXISTS", k) for k in _keys(ns, hashes)], _flag)
        except REDIS_ERRORS:
            self._failed()
            return 0
        return self._looked_up(flags)

    def get_many(self, ns: TierNamespace, hashes: Sequence[Hash]) -> list[bytes | None]:
        if not hashes:
            return []
        if not self._allowed():
            return self._missed(hashes)
        decoder = _Decoder(ns, hashes)
        try:
            out = self._client.pipeline([(b"GET", k) for k in _keys(ns, hashes)], decoder)
        except REDIS_ERRORS:
            self._failed()
            return self._missed(hashes)
        return self._got(decoder, out)

    def read_many(
        self,
        ns: TierNamespace,
        hashes: Sequence[Hash],
        sink: Callable[[int, memoryview], bool | None],
    ) -> list[bool]:
        """Like :meth:`get_many` without the copy: ``sink(i, payload)`` gets each verified
        block straight from the receive buffer (valid during the call only; copy it into the
        KV cache there). Returns which blocks were delivered. A payload is only handed over
        after its checksum passed. Not in :class:`BlockStore`: an optional fast path.
        :meth:`read_blocks` says why a block was not delivered.
        """
        return [r is BlockRead.HIT for r in self.read_blocks(ns, hashes, sink)]

    def read_blocks(
        self,
        ns: TierNamespace,
        hashes: Sequence[Hash],
        sink: Callable[[int, memoryview], bool | None],
    ) -> list[BlockRead]:
        """:meth:`read_many` telling each block's outcome (:class:`BlockRead`): ``HIT``
        (delivered), ``MISS`` (no value), ``BAD`` (a value was read and failed the checks, or
        ``sink`` returned ``False``: refused it) or ``FAILED`` (not read: the call failed or
        the breaker skipped it; on a failure mid-reply the blocks read before it keep theirs).
        """
        if not hashes:
            return []
        if not self._allowed():
            self._missed(hashes)
            return [BlockRead.FAILED] * len(hashes)
        decoder = _Decoder(ns, hashes, sink)
        try:
            self._client.pipeline([(b"GET", k) for k in _keys(ns, hashes)], decoder.deliver)
        except REDIS_ERRORS:
            self._failed()
        return self._got(decoder, decoder.reads)

    def put_many(self, ns: TierNamespace, items: Sequence[Item], *, ttl_s: float) -> int:
        if not items or not self._allowed():
            return 0
        commands = _sets(ns, items, ttl_s)
        try:
            written = self._client.pipeline(commands, _flag)
        except REDIS_ERRORS:
            self._failed()
            return 0
        return self._stored(commands, written)


def _flag(_i: int, reply: Reply) -> bool:
    """EXISTS answers 1/0, SET NX answers OK/nil."""
    return bool(reply) if isinstance(reply, int) else reply is not None


class AsyncRedisBlockStore(_Core):
    """Async store over ``redis.asyncio`` (enginesim, the gateway); same semantics.

    Example: ``await AsyncRedisBlockStore.from_url(url, timeout_s=0.05).lookup(ns, hashes)``.
    """

    def __init__(
        self,
        client: aioredis.Redis | AsyncRedisCluster,
        *,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(retry_s, clock)
        self._client = client
        # One server: the leading count in one script call (one command, one integer reply:
        # redis-py spends ~14 us of CPU per pipelined command, 0.9 ms for 64 EXISTS, on the
        # gateway's event loop). A cluster cannot run it across slots: pipelined EXISTS.
        self._leading = (
            None if isinstance(client, AsyncRedisCluster) else client.register_script(LEADING_LUA)
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_connections: int = 8,
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> AsyncRedisBlockStore:
        _check_pool(max_connections)
        bounds = _redispy_bounds(timeout_s)
        client: aioredis.Redis | AsyncRedisCluster
        if url.startswith("redis+cluster://"):
            target = _cluster_url(url)
            client = AsyncRedisCluster(
                startup_nodes=[AsyncClusterNode(h, p) for h, p in target.nodes],
                max_connections=max_connections,
                username=target.username,
                password=target.password,
                **bounds,
            )
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout_s, **bounds
            )
            client = aioredis.Redis.from_pool(pool)  # owns it: aclose() disconnects the pool
        return cls(client, retry_s=retry_s, clock=clock)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def lookup(self, ns: TierNamespace, hashes: Sequence[Hash]) -> int:
        if not hashes or not self._allowed():
            return 0
        try:
            if self._leading is not None:
                n = int(await self._leading(keys=_keys(ns, hashes)))
                return self._looked_up([True] * n)
            pipe = self._client.pipeline(transaction=False)
            for key in _keys(ns, hashes):
                pipe.exists(key)
            flags = await pipe.execute()
        except REDIS_ERRORS:
            self._failed()
            return 0
        return self._looked_up(flags)

    async def get_many(self, ns: TierNamespace, hashes: Sequence[Hash]) -> list[bytes | None]:
        if not hashes:
            return []
        if not self._allowed():
            return self._missed(hashes)
        pipe = self._client.pipeline(transaction=False)
        for key in _keys(ns, hashes):
            pipe.get(key)
        try:
            values = await pipe.execute()
        except REDIS_ERRORS:
            self._failed()
            return self._missed(hashes)
        decoder = _Decoder(ns, hashes)
        return self._got(decoder, [decoder(i, v) for i, v in enumerate(values)])

    async def put_many(self, ns: TierNamespace, items: Sequence[Item], *, ttl_s: float) -> int:
        if not items or not self._allowed():
            return 0
        commands = _sets(ns, items, ttl_s)
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*_redispy_args(command))
        try:
            results = await pipe.execute()
        except REDIS_ERRORS:
            self._failed()
            return 0
        return self._stored(commands, [r is not None for r in results])
