"""Objects, the global resourceVersion, and a bounded watch history.

Every write takes the next integer of one counter (``metadata.resourceVersion``, sent as a
string like the apiserver's etcd revision) and appends an event to a bounded history. A watch
from resourceVersion ``rv`` replays the history after ``rv`` then follows live events; an
``rv`` older than the history (compacted away) is ``410 Gone``, as from a real apiserver after
etcd compaction. Watchers get bounded queues: a watcher that falls ``WATCH_QUEUE`` events behind
is closed (the client re-watches from its last resourceVersion, as after a real cut).

Stored objects are never mutated in place (a write stores a new dict), so events may share them;
everything handed out is a deep copy.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from enginesim.kube.errors import already_exists, conflict, gone, not_found
from enginesim.kube.resources import Resource

__all__ = ["Event", "Store", "Watcher", "rfc3339"]

HISTORY = 2000
WATCH_QUEUE = 1000

Obj = dict[str, Any]


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True, slots=True)
class Event:
    """One write: ``type`` ADDED/MODIFIED/DELETED, the object after it and before it."""

    rv: int
    resource: str
    namespace: str
    type: str
    obj: Obj
    prev: Obj | None


@dataclass(eq=False, slots=True)
class Watcher:
    """One open watch; ``queue`` yields events, ``None`` when the server closes it."""

    resource: str
    namespace: str | None
    queue: asyncio.Queue[Event | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=WATCH_QUEUE + 1)
    )
    closed: bool = False

    def wants(self, ev: Event) -> bool:
        return ev.resource == self.resource and self.namespace in (None, ev.namespace)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if not self.queue.full():
                self.queue.put_nowait(None)


Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


class Store:
    """All objects of the emulated cluster. ``on_change`` callbacks run after every write."""

    def __init__(
        self,
        *,
        history: int = HISTORY,
        clock: Callable[[], float] = time.time,
        uid: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._rv = 1
        self._objects: dict[str, dict[Key, Obj]] = {}
        self._history: deque[Event] = deque(maxlen=history)
        self._compacted = 1  # events after this rv are all in the history
        self._watchers: set[Watcher] = set()
        self._clock = clock
        self._uid = uid
        self.on_change: list[Callable[[Event], None]] = []

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def compacted(self) -> int:
        return self._compacted

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    # -- reads -----------------------------------------------------------------------------

    def get(self, res: Resource, namespace: str, name: str) -> Obj:
        obj = self._objects.get(res.plural, {}).get((namespace, name))
        if obj is None:
            raise not_found(res.plural, name, res.group)
        return copy.deepcopy(obj)

    def find(self, res: Resource, namespace: str, name: str) -> Obj | None:
        obj = self._objects.get(res.plural, {}).get((namespace, name))
        return None if obj is None else copy.deepcopy(obj)

    def peek(self, res: Resource, namespace: str, name: str) -> Obj | None:
        """The stored object itself (read-only; never mutate it), or None."""
        return self._objects.get(res.plural, {}).get((namespace, name))

    def items(self, res: Resource, namespace: str | None = None) -> Iterator[Obj]:
        """The stored objects themselves (read-only; never mutate them), sorted by key."""
        objs = self._objects.get(res.plural, {})
        for key in sorted(objs):
            if namespace is None or key[0] == namespace:
                yield objs[key]

    def snapshot(self, res: Resource, namespace: str | None = None) -> tuple[list[Obj], int]:
        return [copy.deepcopy(o) for o in self.items(res, namespace)], self._rv

    # -- writes ----------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _commit(self, res: Resource, key: Key, kind: str, obj: Obj | None, prev: Obj | None) -> Obj:
        rv = self._next_rv()
        objs = self._objects.setdefault(res.plural, {})
        if obj is None:  # deleted: the event carries the last state with a new rv
            assert prev is not None
            objs.pop(key, None)
            shown = copy.deepcopy(prev)
            shown["metadata"]["resourceVersion"] = str(rv)
        else:
            obj["metadata"]["resourceVersion"] = str(rv)
            objs[key] = obj
            shown = obj
        ev = Event(rv, res.plural, key[0], kind, shown, prev)
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv
        self._history.append(ev)
        for w in list(self._watchers):
            if not w.wants(ev):
                continue
            if w.queue.qsize() >= WATCH_QUEUE:  # too far behind: end its stream
                self._watchers.discard(w)
                w.close()
            else:
                w.queue.put_nowait(ev)
        for cb in list(self.on_change):
            cb(ev)
        return copy.deepcopy(shown)

    def create(self, res: Resource, namespace: str, obj: Obj) -> Obj:
        new = copy.deepcopy(obj)
        meta = new.setdefault("metadata", {})
        name = str(meta.get("name") or "")
        key = (namespace if res.namespaced else "", name)
        if key in self._objects.get(res.plural, {}):
            raise already_exists(res.plural, name, res.group)
        new["kind"] = res.kind
        new["apiVersion"] = res.api_version
        if res.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        meta["uid"] = self._uid()
        meta["creationTimestamp"] = rfc3339(self._clock())
        meta["generation"] = 1
        for transient in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(transient, None)
        return self._commit(res, key, "ADDED", new, None)

    def update(
        self,
        res: Resource,
        namespace: str,
        name: str,
        obj: Obj,
        *,
        expect_rv: str | None = None,
    ) -> Obj:
        """Replace an object. ``expect_rv`` (the body's resourceVersion, if any) must be the
        current one, else 409 Conflict. Identity fields are kept; ``generation`` increases
        when ``spec`` changes."""
        key = (namespace if res.namespaced else "", name)
        cur = self._objects.get(res.plural, {}).get(key)
        if cur is None:
            raise not_found(res.plural, name, res.group)
        if expect_rv and expect_rv != cur["metadata"]["resourceVersion"]:
            raise conflict(res.plural, name, res.group)
        new = copy.deepcopy(obj)
        new["kind"] = res.kind
        new["apiVersion"] = res.api_version
        meta = new.setdefault("metadata", {})
        old_meta = cur["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds"):  # fmt: skip
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        generation = int(old_meta.get("generation", 1))
        if new.get("spec") != cur.get("spec"):
            generation += 1
        meta["generation"] = generation
        return self._commit(res, key, "MODIFIED", new, cur)

    def mark_deleting(
        self, res: Resource, namespace: str, name: str, grace_s: int, *, status: Obj | None = None
    ) -> Obj:
        """Set ``deletionTimestamp`` (graceful deletion in progress), and ``status`` if given,
        in one write."""
        key = (namespace, name)
        cur = self._objects.get(res.plural, {}).get(key)
        if cur is None:
            raise not_found(res.plural, name, res.group)
        new = copy.deepcopy(cur)
        new["metadata"]["deletionTimestamp"] = rfc3339(self._clock() + grace_s)
        new["metadata"]["deletionGracePeriodSeconds"] = grace_s
        if status is not None:
            new["status"] = copy.deepcopy(status)
        return self._commit(res, key, "MODIFIED", new, cur)

    def delete(self, res: Resource, namespace: str, name: str) -> Obj:
        key = (namespace if res.namespaced else "", name)
        cur = self._objects.get(res.plural, {}).get(key)
        if cur is None:
            raise not_found(res.plural, name, res.group)
        return self._commit(res, key, "DELETED", None, cur)

    # -- watch -----------------------------------------------------------------------------

    def watch(
        self, res: Resource, namespace: str | None, since: int | None
    ) -> tuple[list[Event], Watcher]:
        """Events to replay and a registered watcher for what follows (no gap, no repeat).

        ``since=None`` (resourceVersion unset or "0"): synthetic ADDED events for every
        current object, then live events. Otherwise the history after ``since``; 410 when
        ``since`` is older than the history.
        """
        if since is not None and since < self._compacted:
            raise gone(f"too old resource version: {since} ({self._compacted})")
        w = Watcher(res.plural, namespace)
        if since is None:
            replay = [Event(int(o["metadata"]["resourceVersion"]), res.plural,
                            o["metadata"].get("namespace", ""), "ADDED", o, None)
                      for o in self.items(res, namespace)]  # fmt: skip
        else:
            replay = [ev for ev in self._history if ev.rv > since and w.wants(ev)]
        self._watchers.add(w)
        return replay, w

    def unwatch(self, w: Watcher) -> None:
        self._watchers.discard(w)
        w.closed = True

    def cut_watches(self) -> int:
        """Close every open watch stream once (a fault); returns how many."""
        cut = list(self._watchers)
        self._watchers.clear()
        for w in cut:
            w.close()
        return len(cut)
