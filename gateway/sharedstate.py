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
  (:data:`gateway.sharedwire.SYNC_LUA`, one round trip, atomic) that writes this replica's
  heartbeat (ZSET ``<prefix>rs:replicas``, scored with Redis server time, so no clock skew
  between hosts) and its per-engine counts (hash ``<prefix>rs:load``, a field per live
  replica), drops replicas silent for ``liveness`` = max(1 s, 5 intervals), reads the other
  live replicas' counts, appends this replica's batch -- new prefix records and VTC charges
  -- to the stream ``<prefix>rs:events`` (one entry per sync, ``XADD MAXLEN ~``) and reads
  the other replicas' entries since its last id.
* **arrivals** (autoscaling enabled): each sync also writes this replica's cumulative
  arrival totals per model (hash ``<prefix>rs:arrivals``, a field per live replica) and
  reads the others'; :meth:`SharedRoutingState.read_arrivals` gives the embedded
  autoscaler every live replica's totals (its own straight from its counter), which
  :class:`autoscale.arrivals.FleetRateMeter` differences per replica. While Redis is down
  the reading is this replica's totals x the live replicas last seen, marked estimated;
* **applied locally**: the other replicas' counts are summed per engine and replace
  ``EngineState``'s remote counts wholesale (snapshots add them); their prefix records are
  inserted into the local index as approximate entries (the same as its own commits); their
  charges are added to the local VTC counters (each replica keeps its own lifts).
* **kept local, on purpose**: the decayed counts of requests routed and placements made per
  engine (the prefix-cache scorer's balance and placement terms) and the tie-break order.
  Each replica balances its own share; sharing them was measured worse (the benchmark's
  16 x 16 groups: one engine home to 5 groups in each of 6 diagnostic runs with them,
  4/4/4/4 in each of 4 without; benchmarks/routing/README.md). Each replica starts
  its request sequence at a random offset, so seq-derived tie-breaks differ between
  replicas (with equal sequences their first requests all picked the same engine).

**Staleness**: a replica sees another's state as of that replica's last sync, fetched by its
own next sync: between 0 and 2 intervals plus one round trip old (about one interval, 50 ms,
on average). A prefix group's second request reaching another replica within that window
is placed without knowing the first (a second cold placement), and two placements made
on different replicas within it may pick the same engine; in-flight and queued-prefill
counts lag the same way (a prefill that ended up to two intervals ago still looks queued).
Engine ids come from the config and must be equal across replicas (records for engines a
replica does not know are ignored).

**Bounds**: the outbox keeps the newest :data:`OUTBOX_RECORDS` records; a chain is cut to
its first ``MAX_RECORD_HASHES`` blocks (a prefix of a chain is a chain); one sync publishes
at most ``MAX_PUBLISH_BYTES`` (both in :mod:`gateway.sharedwire`) and reads at most
:data:`READ_COUNT` entries or :data:`MAX_READ_BYTES` (a replica that fell behind catches up
over several syncs; one that fell behind the stream's :data:`STREAM_MAXLEN` entries loses
the trimmed ones -- the index is approximate); the load hash holds one field per live
replica; every key has a TTL, so a fleet that stops leaves nothing behind. VTC: each user's
service on other replicas reaches this replica's counter within the staleness above, unless
trimmed unread; charges made while Redis is down are published when it is back (at most
``max_users`` users).

**Redis down** (:meth:`RedisLink.call` returns None): the replica serves on local state;
after ``liveness`` without a good sync the remote counts are cleared (a vanished replica's
load must not stick), :meth:`SharedRoutingState.replicas` keeps the last known count; the
sync resumes when the link's probe closes the breaker.

**Cost**: one sync is ~150-200 us of CPU back to back on the shared 2-core test host, but
~0.8 ms at 20 syncs/s (the host's wake-up cost after each sleep dominates: a PING alone
costs ~0.6 ms there), so ~17 ms of CPU per second per replica at the default interval and
~77 ms at 0.01 s; Redis spends ~150 us per script call.

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
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis

from autoscale.arrivals import FleetReading, totals_of
from gateway.endpoints import EndpointRegistry
from gateway.metricspec import Label, MetricSpec
from gateway.redislink import RedisLink
from gateway.router import Router
from gateway.settings import Settings
from gateway.sharedwire import (
    NO_LOAD,
    SYNC_LUA,
    Load,
    SyncReply,
    pack_arrivals,
    pack_batch,
    pack_loads,
    pack_prefixes,
    parse_reply,
    sum_loads,
    unpack_arrivals,
    unpack_batch,
    unpack_loads,
)

log = logging.getLogger(__name__)

__all__ = ["METRICS", "SharedRoutingState", "new_replica_id"]

OUTBOX_RECORDS = 4096
"""Prefix records kept for the next sync (the oldest are dropped beyond it)."""
READ_COUNT = 64
"""Stream entries one sync reads at most (each one replica's sync)."""
MAX_READ_BYTES = 512 * 1024
"""Payload bytes one sync reads at most (bounds the inserts one sync does on the loop)."""
STREAM_MAXLEN = 512
"""``XADD MAXLEN ~``: entries kept (Redis trims whole nodes, so slightly more)."""
STREAM_TTL_S = 120.0
"""The stream expires this long after the last entry (a stopped fleet leaves nothing)."""


def new_replica_id() -> str:
    """Random per process (a restarted worker is a new replica), with the pid to read logs."""
    return f"{secrets.token_hex(6)}-{os.getpid()}"


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("switchyard_shared_state_sync_seconds", "histogram", "seconds", when="redis_url"),
    MetricSpec("switchyard_shared_state_replicas", "gauge", "replicas", when="redis_url"),
    MetricSpec("switchyard_shared_state_sync_errors_total", "counter", "errors",
               when="redis_url"),
    MetricSpec("switchyard_shared_state_prefix_records_total", "counter", "records",
               (Label("direction", values=("sent", "received")),), when="redis_url"),
)  # fmt: skip


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
        self._keys = [
            link.key("rs", "replicas"),
            link.key("rs", "load"),
            link.key("rs", "events"),
            link.key("rs", "arrivals"),
        ]
        self._script: Any = None  # redis-py AsyncScript, made on the serving loop
        self._last_id = ""
        self._last_ok: float | None = None
        self._remote_set = False
        self._synced = False  # the last sync attempt was good
        self._arrivals: dict[str, bytes] = {}  # the other live replicas', as last synced
        self._replicas = settings.limits.replicas
        self._charges: dict[str, float] = {}  # VTC charges not yet published
        self.outbox: deque[tuple[str, tuple[int, ...]]] = deque(maxlen=OUTBOX_RECORDS)
        router.outbox = self.outbox
        endpoints.advance_seq(secrets.randbelow(1 << 32))  # tie-breaks differ per replica
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
            "Prefix records exchanged with other replicas (sent: deduplicated per sync)",
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
            self._synced = False
            self.sync_errors.inc()
            self._stale()
            return False
        started = time.perf_counter()
        prefixes, taken = pack_prefixes(list(self.outbox))
        _merge(self._charges, self.router.vtc.take_charges(), self.router.vtc.max_users)
        loads: dict[str, Load] = {}
        for state in self.endpoints:
            loads[state.id] = state.engine.local_load()
        arrivals = self.router.arrivals
        args = [
            self.replica_id,
            pack_loads(loads),
            int(self.liveness_s * 1000),
            self._last_id,
            READ_COUNT,
            STREAM_MAXLEN,
            int(STREAM_TTL_S * 1000),
            pack_batch(prefixes, self._charges),
            MAX_READ_BYTES,
            b"" if arrivals is None else pack_arrivals(arrivals.snapshot()),
        ]
        raw = await self.link.call("shared_state", lambda r: self._run_script(r, args))
        reply: SyncReply | None = None
        if raw is not None:
            try:
                reply = parse_reply(raw, replica_id=self.replica_id)
            except (ValueError, TypeError) as exc:
                log.warning("shared routing state: bad sync reply (%s)", exc)
        if reply is None:
            self._synced = False
            self.sync_errors.inc()
            self._stale()
            return False
        for _ in range(min(taken, len(self.outbox))):
            self.outbox.popleft()
        self._charges = {}
        if prefixes:
            self._sent.inc(len(prefixes))
        self._apply(reply)
        self._synced = True
        self._last_ok = self._clock()
        self.sync_seconds.observe(time.perf_counter() - started)
        return True

    async def leave(self) -> None:
        """Deregister (shutdown): the others stop counting this replica at once."""
        replicas, load, _, arrivals = self._keys

        async def remove(r: Redis) -> None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zrem(replicas, self.replica_id)
                pipe.hdel(load, self.replica_id)
                pipe.hdel(arrivals, self.replica_id)
                await pipe.execute()

        await self.link.call("shared_state_leave", remove)

    def read_arrivals(self, model: str | None) -> FleetReading:
        """Every live replica's cumulative arrivals of ``model`` (``None``: all models) for
        the embedded autoscaler (:class:`autoscale.arrivals.ArrivalReader`): this one's
        from its counter, the others' as of the last sync. ``estimated`` (this replica's
        totals alone, to be scaled by the live replicas last seen) when the last sync
        failed, none succeeded yet, or the last good one is older than ``liveness``."""
        counter = self.router.arrivals
        own = counter.totals(model) if counter is not None else totals_of({}, model)
        totals = {self.replica_id: own}
        age = None if self._last_ok is None else self._clock() - self._last_ok
        if not self._synced or age is None or age > self.liveness_s:
            return FleetReading(totals, self.replica_id, self._replicas, estimated=True)
        for rid, blob in self._arrivals.items():
            try:
                totals[rid] = totals_of(unpack_arrivals(blob), model)
            except ValueError as exc:  # left out: a baseline again once it reads well
                log.warning("shared routing state: replica %s sent bad arrivals (%s)", rid, exc)
        return FleetReading(totals, self.replica_id, self._replicas)

    def describe(self) -> dict[str, Any]:
        """For ``/ready``: replica id, live replicas, age of the last good sync."""
        age = None if self._last_ok is None else round(self._clock() - self._last_ok, 3)
        return {"replica": self.replica_id, "replicas": self._replicas, "last_sync_age_s": age}

    # -- internals ------------------------------------------------------------------------
    async def _run_script(self, client: Redis, args: list[Any]) -> Any:
        if self._script is None:
            self._script = client.register_script(SYNC_LUA)
        return await self._script(keys=self._keys, args=args)

    def _apply(self, reply: SyncReply) -> None:
        self._last_id = reply.last_id
        self._arrivals = reply.arrivals  # unpacked when read (once per autoscaler tick)
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
            n, tokens, prefill = totals.get(state.id, NO_LOAD)
            state.engine.set_remote(in_flight=n, in_flight_tokens=tokens, prefill_tokens=prefill)
        self._remote_set = bool(totals)
        received = 0
        for blob in reply.entries:
            try:
                batch = unpack_batch(blob)
            except ValueError as exc:
                log.warning("shared routing state: bad stream entry (%s)", exc)
                continue
            for endpoint_id, hashes in batch.prefixes:
                if self.endpoints.get(endpoint_id) is not None:
                    self.router.index.insert(endpoint_id, hashes)
                    received += 1
            if batch.charges:
                self.router.vtc.add_remote(batch.charges)
        if received:
            self._received.inc(received)

    def _stale(self) -> None:
        """No good sync for ``liveness``: drop the remote counts (nothing sticks)."""
        if not self._remote_set:
            return
        if self._last_ok is not None and self._clock() - self._last_ok < self.liveness_s:
            return
        for state in self.endpoints:
            state.engine.set_remote()
        self._remote_set = False


def _merge(into: dict[str, float], charges: Mapping[str, float], limit: int) -> None:
    """Add ``charges`` into ``into``, at most ``limit`` users."""
    for user, cost in charges.items():
        if user in into or len(into) < limit:
            into[user] = into.get(user, 0.0) + cost
