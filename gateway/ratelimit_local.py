"""The sliding window log with amounts, in process: the limiter when Redis is down or absent.

The same algorithm as the Redis script of :mod:`gateway.ratelimit_lua`, in Python, on an
injected clock: each rule keeps a log of ``(time, amount)`` entries and their running sum.
Entries at least ``window_ms`` old expire first; a request fits when ``used + amount <=
limit`` for every rule it names, and is then charged to all of them (all or nothing). So at
most ``limit`` is admitted in ANY ``window_ms`` interval (no 2x at a window edge), and the
whole limit may go as one burst.

A denied rule reports when enough of its oldest entries will have expired for the request
to fit (``retry_ms``), or :data:`NEVER` when the request is larger than the whole limit.
State is bounded: at most ``max_rules`` logs (least recently used dropped first) and, since
every entry holds at least 1, at most ``limit`` entries per log.

Example::

    windows = LocalWindows(window_ms=60_000)
    status, results = windows.decide([(("key", "requests", "k_1"), 30, 1)], seq="a.1", now_ms=0)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

__all__ = ["ADMITTED", "DENIED", "FITS", "NEVER", "TOO_LARGE", "LocalWindows", "RuleResult"]

# Item status (the Redis script returns the same codes).
ADMITTED = 1
DENIED = 0
TOO_LARGE = -1
# retry_ms of a rule that did not block the request / that no wait can satisfy.
FITS = -1
NEVER = -2

RuleResult = tuple[int, int, int]
"""Per rule: ``(used, reset_ms, retry_ms)``. ``used`` counts this request when admitted
(else the usage it was denied against); ``reset_ms`` is the time until the rule is back to
its whole limit; ``retry_ms`` is :data:`FITS`, :data:`NEVER`, or the wait until it fits."""


class _Log:
    """One rule's entries, oldest first: ``seq -> (time_ms, amount)``, and their sum."""

    __slots__ = ("entries", "used")

    def __init__(self) -> None:
        self.entries: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.used = 0

    def expire(self, cutoff_ms: int) -> None:
        entries = self.entries
        while entries:
            seq, (at, amount) = next(iter(entries.items()))
            if at > cutoff_ms:
                return
            del entries[seq]
            self.used -= amount

    def retry_ms(self, need: int, now_ms: int, window_ms: int) -> int:
        """Time until ``need`` of the oldest amount has expired."""
        freed = 0
        for at, amount in self.entries.values():
            freed += amount
            if freed >= need:
                return max(1, at + window_ms - now_ms)
        return window_ms  # the sum drifted from the entries: one whole window is safe

    def reset_ms(self, now_ms: int, window_ms: int) -> int:
        if not self.entries:
            return 0
        at, _ = next(reversed(self.entries.values()))
        return max(0, at + window_ms - now_ms)


class LocalWindows:
    """Sliding window logs keyed by any hashable rule key (see the module docstring)."""

    def __init__(self, *, window_ms: int, max_rules: int = 100_000) -> None:
        self.window_ms = window_ms
        self.max_rules = max_rules
        self._logs: OrderedDict[Hashable, _Log] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    def clear(self) -> None:
        self._logs.clear()

    def _log(self, key: Hashable, now_ms: int) -> _Log:
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = _Log()
            if len(self._logs) > self.max_rules:
                self._logs.popitem(last=False)
        else:
            self._logs.move_to_end(key)
        log.expire(now_ms - self.window_ms)
        return log

    def decide(
        self, checks: Sequence[tuple[Hashable, int, int]], *, seq: str, now_ms: int
    ) -> tuple[int, list[RuleResult]]:
        """Admit ``seq`` against every ``(key, limit, amount)`` or none of them.

        Returns the status (:data:`ADMITTED`, :data:`DENIED`, :data:`TOO_LARGE`) and one
        :data:`RuleResult` per check, in order."""
        logs = [self._log(key, now_ms) for key, _, _ in checks]
        status = ADMITTED
        retries: list[int] = []
        for log, (_, limit, amount) in zip(logs, checks, strict=True):
            if amount > limit:
                retries.append(NEVER)
                status = TOO_LARGE
            elif log.used + amount > limit:
                retries.append(log.retry_ms(log.used + amount - limit, now_ms, self.window_ms))
                if status == ADMITTED:
                    status = DENIED
            else:
                retries.append(FITS)
        if status != ADMITTED:
            return status, [
                (log.used, log.reset_ms(now_ms, self.window_ms), retry)
                for log, retry in zip(logs, retries, strict=True)
            ]
        results: list[RuleResult] = []
        for log, (_, _, amount) in zip(logs, checks, strict=True):
            log.entries[seq] = (now_ms, amount)
            log.used += amount
            results.append((log.used, self.window_ms, FITS))
        return status, results

    def settle(self, key: Hashable, seq: str, amount: int, *, now_ms: int) -> None:
        """Replace the amount of entry ``seq`` (removed when ``amount`` <= 0); nothing when
        it has expired or its log was dropped."""
        log = self._logs.get(key)
        if log is None:
            return
        log.expire(now_ms - self.window_ms)
        entry = log.entries.get(seq)
        if entry is None:
            return
        at, old = entry
        if amount <= 0:
            del log.entries[seq]
            log.used -= old
        else:
            log.entries[seq] = (at, amount)
            log.used += amount - old
