"""Bounded in-memory prefix index: which endpoint holds which chained prefix block.

Two sources of truth live side by side (DESIGN.md, "Prefix-cache-aware routing"):

* **approximate** entries record what the gateway *routed* (``insert`` after each pick); they
  expire after ``ttl_s`` and are evicted oldest-first under the global budget;
* **precise** entries mirror what an engine *reports* through KV events (``store_precise`` /
  ``remove_precise`` / ``clear_precise``, fed by :mod:`kvcache.precise`). Once an endpoint has
  a precise feed, its approximate entries only count for ``speculative_ttl_s`` -- long enough
  to bridge the gap until the engine's ``BlockStored`` event arrives, short enough that a
  block the engine never cached (or evicted) stops attracting traffic.

The budget ``max_pairs`` bounds the number of ``(block hash, endpoint)`` pairs over both
sources; :meth:`PrefixIndex.stats` reports counts and an estimate of the bytes used, so the
gateway can export them as metrics. Chains are inserted tail-first, so under pressure the
tail of a prefix is evicted before its head (as vLLM does), keeping short matches alive.

Not thread-safe: one owner (the gateway's event loop) mutates it. The clock is injected.

Example::

    index = PrefixIndex(max_pairs=100_000, ttl_s=600)
    index.insert("e1", hashes)
    index.match(hashes)  # {"e1": len(hashes)}
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["IndexStats", "PrefixIndex"]

# Measured with tracemalloc on CPython 3.11 (tests/kvcache/test_index.py checks the estimate
# stays within 2x of the real allocation): one OrderedDict slot + int key + per-entry dict,
# and one more dict slot + float per extra endpoint sharing the block.
_BYTES_PER_ENTRY = 300
_BYTES_PER_PAIR = 60


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Sizes and counters for metrics: ``switchyard_prefix_index_*``."""

    entries: int
    approx_pairs: int
    precise_pairs: int
    max_pairs: int
    bytes_estimate: int
    evicted_budget: int
    evicted_ttl: int
    precise_endpoints: int

    @property
    def pairs(self) -> int:
        return self.approx_pairs + self.precise_pairs


class PrefixIndex:
    """Block hash -> endpoints, bounded by LRU + TTL + a global pair budget. See module doc."""

    def __init__(
        self,
        *,
        max_pairs: int = 1_000_000,
        ttl_s: float = 600.0,
        speculative_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_pairs <= 0 or ttl_s <= 0 or speculative_ttl_s < 0:
            raise ValueError("max_pairs and ttl_s must be positive, speculative_ttl_s >= 0")
        self.max_pairs = max_pairs
        self.ttl_s = ttl_s
        self.speculative_ttl_s = speculative_ttl_s
        self._clock = clock
        # hash -> {endpoint: inserted_at}; order = last insert (oldest first).
        self._approx: OrderedDict[int, dict[str, float]] = OrderedDict()
        # hash -> {endpoint: stored_at}; order = last store.
        self._precise: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._precise_endpoints: set[str] = set()
        self._prefix_closed = True  # no holes cut by remove(): match may binary-search
        self._approx_pairs = 0
        self._precise_pairs = 0
        self._evicted_budget = 0
        self._evicted_ttl = 0

    # -- approximate (what we routed) ---------------------------------------------------
    def insert(self, endpoint: str, hashes: Sequence[int]) -> None:
        """Record that ``endpoint`` was sent a prompt with these chained block hashes."""
        now = self._clock()
        # Head ends up most recent: tails are evicted first.
        self._approx_pairs += _record(self._approx, endpoint, reversed(hashes), now)
        self._expire(now)
        self._enforce_budget()

    def remove(self, endpoint: str, hashes: Iterable[int]) -> None:
        """Forget approximate entries of ``endpoint`` for these hashes (e.g. a failed request)."""
        self._prefix_closed = False  # holes possible: match walks from now on
        for h in hashes:
            self._approx_pairs -= _discard(self._approx, h, endpoint)

    # -- precise (KV events) ------------------------------------------------------------
    def enable_precise(self, endpoint: str) -> None:
        """Mark ``endpoint`` as event-fed: its approximate entries become speculative."""
        self._precise_endpoints.add(endpoint)

    def store_precise(self, endpoint: str, hashes: Iterable[int]) -> None:
        """The engine reported these blocks cached (``BlockStored``, re-hashed)."""
        self._precise_endpoints.add(endpoint)
        self._precise_pairs += _record(self._precise, endpoint, hashes, self._clock())
        self._enforce_budget()

    def remove_precise(self, endpoint: str, hashes: Iterable[int]) -> None:
        """The engine evicted these blocks (``BlockRemoved``)."""
        for h in hashes:
            self._precise_pairs -= _discard(self._precise, h, endpoint)

    def clear_precise(self, endpoint: str) -> None:
        """The engine dropped its whole cache (``AllBlocksCleared``); O(index size)."""
        self._precise_pairs -= _drop_all(self._precise, endpoint)

    # -- both ---------------------------------------------------------------------------
    def drop_endpoint(self, endpoint: str) -> None:
        """Forget everything about an endpoint that left the pool; O(index size)."""
        self._approx_pairs -= _drop_all(self._approx, endpoint)
        self._precise_pairs -= _drop_all(self._precise, endpoint)
        self._precise_endpoints.discard(endpoint)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Endpoint -> number of *leading* blocks of ``hashes`` it is believed to hold.

        Endpoints holding no leading block are absent. ``hashes`` is a chain (each hash names
        its whole prefix). With only approximate entries recorded by :meth:`insert`, an
        endpoint's blocks of a chain form a prefix of it (a chain is recorded whole, head
        most recent, so expiry and the budget take tails first), and each holder's length is
        found by binary search: O(holders x log blocks). Once :meth:`remove` has cut holes,
        or with KV-event entries, a walk checking every pair: O(matched blocks x holders).
        """
        if not hashes:
            return {}
        now = self._clock()
        self._expire(now)
        candidates = self._holders(hashes[0], now)
        if not self._precise_endpoints and self._prefix_closed:
            return {e: _held_prefix(self._approx, hashes, e) for e in candidates}
        result: dict[str, int] = {}
        for i in range(1, len(hashes)):
            if not candidates:
                return result
            holders = self._holders(hashes[i], now)
            lost = candidates - holders
            if lost:
                for endpoint in lost:
                    result[endpoint] = i
                candidates -= lost
        for endpoint in candidates:
            result[endpoint] = len(hashes)
        return result

    def stats(self) -> IndexStats:
        entries = len(self._approx) + len(self._precise)
        pairs = self._approx_pairs + self._precise_pairs
        return IndexStats(
            entries=entries,
            approx_pairs=self._approx_pairs,
            precise_pairs=self._precise_pairs,
            max_pairs=self.max_pairs,
            bytes_estimate=entries * _BYTES_PER_ENTRY + max(0, pairs - entries) * _BYTES_PER_PAIR,
            evicted_budget=self._evicted_budget,
            evicted_ttl=self._evicted_ttl,
            precise_endpoints=len(self._precise_endpoints),
        )

    # -- internals ----------------------------------------------------------------------
    def _holders(self, h: int, now: float) -> set[str]:
        approx = self._approx.get(h)
        out: set[str] = set()
        if approx:
            if self._precise_endpoints:
                horizon = now - self.speculative_ttl_s
                out.update(
                    e for e, t in approx.items() if e not in self._precise_endpoints or t >= horizon
                )
            else:
                out.update(approx)
        precise = self._precise.get(h)
        if precise:
            out.update(precise)
        return out

    def _expire(self, now: float) -> None:
        """Pop approximate entries whose newest insert is older than ``ttl_s`` (front first)."""
        approx = self._approx
        horizon = now - self.ttl_s
        while approx:
            h, holders = next(iter(approx.items()))
            if max(holders.values()) >= horizon:
                return
            approx.popitem(last=False)
            self._approx_pairs -= len(holders)
            self._evicted_ttl += len(holders)

    def _enforce_budget(self) -> None:
        while self._approx_pairs + self._precise_pairs > self.max_pairs:
            source = self._approx if self._approx else self._precise
            _, holders = source.popitem(last=False)
            if source is self._approx:
                self._approx_pairs -= len(holders)
            else:
                self._precise_pairs -= len(holders)
            self._evicted_budget += len(holders)


def _record(
    table: OrderedDict[int, dict[str, float]], endpoint: str, hashes: Iterable[int], now: float
) -> int:
    """Stamp ``endpoint`` on each hash at ``now`` and make it most recent; the new pairs."""
    added = 0
    for h in hashes:
        holders = table.get(h)
        if holders is None:
            table[h] = {endpoint: now}
            added += 1
            continue
        if endpoint not in holders:
            added += 1
        holders[endpoint] = now
        table.move_to_end(h)
    return added


def _held_prefix(
    table: Mapping[int, dict[str, float]], hashes: Sequence[int], endpoint: str
) -> int:
    """How many leading ``hashes`` ``endpoint`` holds, given it holds the first and its
    blocks of the chain form a prefix of it (binary search)."""
    lo, hi = 1, len(hashes)
    while lo < hi:
        mid = (lo + hi) // 2
        holders = table.get(hashes[mid])
        if holders is not None and endpoint in holders:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _discard(table: OrderedDict[int, dict[str, float]], h: int, endpoint: str) -> int:
    holders = table.get(h)
    if holders is None or endpoint not in holders:
        return 0
    del holders[endpoint]
    if not holders:
        del table[h]
    return 1


def _drop_all(table: OrderedDict[int, dict[str, float]], endpoint: str) -> int:
    dropped = 0
    for h in [h for h, holders in table.items() if endpoint in holders]:
        dropped += _discard(table, h, endpoint)
    return dropped
