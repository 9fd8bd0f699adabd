"""The store: one global resourceVersion, watch replay without gaps, 410 past the history,
optimistic concurrency, bounded watcher queues."""

from __future__ import annotations

import itertools

import pytest

from enginesim.kube import store as store_mod
from enginesim.kube.errors import ApiError
from enginesim.kube.resources import LEASES, NAMESPACES, PODS
from enginesim.kube.store import Store


def _store(history: int = 100) -> Store:
    counter = itertools.count()
    s = Store(history=history, clock=lambda: 1_700_000_000.0, uid=lambda: f"uid-{next(counter)}")
    s.create(NAMESPACES, "", {"metadata": {"name": "default"}})
    return s


def test_resource_versions_increase_globally_and_identity_is_set() -> None:
    s = _store()
    a = s.create(PODS, "default", {"metadata": {"name": "a"}})
    b = s.create(LEASES, "default", {"metadata": {"name": "b"}, "spec": {}})
    assert int(b["metadata"]["resourceVersion"]) == int(a["metadata"]["resourceVersion"]) + 1
    assert a["metadata"]["uid"] != b["metadata"]["uid"]
    assert a["metadata"]["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert (a["kind"], a["apiVersion"], b["apiVersion"]) == ("Pod", "v1", "coordination.k8s.io/v1")
    with pytest.raises(ApiError) as err:
        s.create(PODS, "default", {"metadata": {"name": "a"}})
    assert err.value.status["reason"] == "AlreadyExists"
    assert err.value.code == 409


def test_update_checks_resource_version_and_bumps_generation_on_spec_change() -> None:
    s = _store()
    lease = s.create(
        LEASES, "default", {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}
    )
    rv = lease["metadata"]["resourceVersion"]
    lease["spec"]["holderIdentity"] = "b"
    new = s.update(LEASES, "default", "l", lease, expect_rv=rv)
    assert new["metadata"]["generation"] == 2
    with pytest.raises(ApiError) as err:
        s.update(LEASES, "default", "l", lease, expect_rv=rv)  # stale
    assert (err.value.code, err.value.status["reason"]) == (409, "Conflict")
    new["metadata"]["labels"] = {"x": "y"}
    same_spec = s.update(LEASES, "default", "l", new)
    assert same_spec["metadata"]["generation"] == 2
    assert same_spec["metadata"]["uid"] == lease["metadata"]["uid"]


@pytest.mark.anyio
async def test_watch_replays_after_rv_then_follows_live_events() -> None:
    s = _store()
    first = s.create(PODS, "default", {"metadata": {"name": "a"}})
    s.create(PODS, "default", {"metadata": {"name": "b"}})
    s.create(LEASES, "default", {"metadata": {"name": "other"}})
    replay, w = s.watch(PODS, "default", int(first["metadata"]["resourceVersion"]))
    assert [(e.type, e.obj["metadata"]["name"]) for e in replay] == [("ADDED", "b")]
    s.delete(PODS, "default", "a")
    ev = w.queue.get_nowait()
    assert ev is not None and (ev.type, ev.obj["metadata"]["name"]) == ("DELETED", "a")
    assert int(ev.obj["metadata"]["resourceVersion"]) == s.resource_version
    s.cut_watches()
    assert w.queue.get_nowait() is None
    full, _ = s.watch(PODS, None, None)  # no rv: the current objects as ADDED
    assert [e.obj["metadata"]["name"] for e in full] == ["b"]


def test_watch_from_before_the_history_is_gone() -> None:
    s = _store(history=5)
    start = s.resource_version
    for i in range(10):
        s.create(PODS, "default", {"metadata": {"name": f"p{i}"}})
    with pytest.raises(ApiError) as err:
        s.watch(PODS, "default", start)
    assert err.value.code == 410
    replay, _ = s.watch(PODS, "default", s.compacted)
    assert len(replay) == 5


@pytest.mark.anyio
async def test_a_watcher_too_far_behind_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "WATCH_QUEUE", 3)
    s = _store()
    _, w = s.watch(PODS, "default", s.resource_version)
    for i in range(5):
        s.create(PODS, "default", {"metadata": {"name": f"p{i}"}})
    got = []
    while not w.queue.empty():
        got.append(w.queue.get_nowait())
    assert got[-1] is None and len(got) == 4
    assert s.watchers == 0
