"""Leader election on a ``coordination.k8s.io/v1`` Lease, so exactly one autoscaler actuates.

The algorithm is client-go's ``leaderelection`` with a Lease lock, in two parts:

* pure: :func:`judge` says what a candidate may do with the record it read (create it,
  renew its own, acquire a released one, take over an expired one, or wait), and
  :func:`claimed` / :func:`released` build the record to write. A lease held by another is
  expired when ``renewTime + leaseDurationSeconds < now`` (wall clock; the cluster's clocks
  are assumed synchronised, as the Lease's absolute times require). Table-tested;
* I/O: :class:`LeaderElector` reads the Lease every ``retry_period_s`` and writes with
  optimistic concurrency: an update carries the ``resourceVersion`` it read, so of two
  candidates racing for an expired lease the API accepts one and answers the other 409
  Conflict (as it does a create of a Lease that already exists); the loser re-reads and sees
  the winner. On shutdown it releases the lease (``holderIdentity`` cleared,
  ``leaseDurationSeconds`` 1, client-go's ``ReleaseOnCancel``) so a peer takes over at once.

Safety: a leader counts itself leader only until ``renew_deadline_s`` after the start of
its last successful renewal (monotonic clock), and peers may take over only
``lease_duration_s`` after that renewal's ``renewTime``: the gap (client-go's defaults
15 s - 10 s) is when a leader that cannot reach the API has already stopped actuating and
nobody else has started yet. :meth:`LeaderElector.safe_window_s` bounds each scale patch's
timeout so that a patch never outlives the gap. Defaults are client-go's: lease 15 s, renew
deadline 10 s, retry period 2 s.

Example::

    elector = LeaderElector(api, name="switchyard-autoscaler", namespace="default",
                            identity="gw-0_4242")
    async with anyio.create_task_group() as tg:
        tg.start_soon(elector.run)
        ...
        if elector.is_leader(): ...
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import anyio

from autoscale.kube import KubeApi, KubeConflict, KubeError, KubeNotFound

__all__ = [
    "LeaderElector",
    "LeaseRecord",
    "Verdict",
    "claimed",
    "judge",
    "released",
]

log = logging.getLogger(__name__)


class Verdict(enum.StrEnum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # ours
    ACQUIRE = "acquire"  # released (no holder)
    TAKE_OVER = "take_over"  # another's, expired
    WAIT = "wait"  # another's, still valid


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A Lease's spec, times as Unix seconds: ``LeaseRecord(holder="a", duration_s=15,
    renew_time=1700000000.0)``. ``holder`` "" means released."""

    holder: str
    duration_s: float
    renew_time: float | None = None
    acquire_time: float | None = None
    transitions: int = 0
    resource_version: str | None = None


def judge(record: LeaseRecord | None, *, identity: str, now: float) -> Verdict:
    """What ``identity`` may do at wall time ``now`` with the ``record`` it read."""
    if record is None:
        return Verdict.CREATE
    if record.holder == identity:
        return Verdict.RENEW
    if not record.holder:
        return Verdict.ACQUIRE
    if record.renew_time is None or record.renew_time + record.duration_s < now:
        return Verdict.TAKE_OVER
    return Verdict.WAIT


def claimed(
    record: LeaseRecord | None, *, identity: str, now: float, duration_s: float
) -> LeaseRecord:
    """The record ``identity`` writes to hold the lease from ``now`` (a renewal keeps the
    acquire time; a change of holder counts one transition)."""
    if record is None:
        return LeaseRecord(identity, duration_s, renew_time=now, acquire_time=now)
    ours = record.holder == identity
    return replace(
        record,
        holder=identity,
        duration_s=duration_s,
        renew_time=now,
        acquire_time=record.acquire_time if ours else now,
        transitions=record.transitions if ours else record.transitions + 1,
    )


def released(record: LeaseRecord, *, now: float) -> LeaseRecord:
    """The record a leader writes when it steps down (client-go's ReleaseOnCancel)."""
    return replace(record, holder="", duration_s=1, renew_time=now, acquire_time=now)


# -- wire format ---------------------------------------------------------------------------
def _micro_time(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def record_from_json(body: Mapping[str, Any]) -> LeaseRecord:
    spec = body.get("spec") or {}
    meta = body.get("metadata") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration_s=float(spec.get("leaseDurationSeconds") or 0),
        renew_time=_parse_time(spec.get("renewTime")),
        acquire_time=_parse_time(spec.get("acquireTime")),
        transitions=int(spec.get("leaseTransitions") or 0),
        resource_version=meta.get("resourceVersion"),
    )


def record_to_json(record: LeaseRecord, *, name: str, namespace: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if record.resource_version is not None:
        meta["resourceVersion"] = record.resource_version
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": record.holder,
            "leaseDurationSeconds": max(1, int(record.duration_s)),
            "renewTime": _micro_time(record.renew_time),
            "acquireTime": _micro_time(record.acquire_time),
            "leaseTransitions": record.transitions,
        },
    }


# -- the elector -----------------------------------------------------------------------------
class LeaderElector:
    """Acquires, renews and releases one Lease; see the module docstring.

    ``on_change(leading)`` is called when leadership is gained or lost. ``wall`` (Unix
    seconds, the Lease's times) and ``monotonic`` (the deadline) are injectable.
    ``release_on_cancel`` releases the lease when :meth:`run` is cancelled.
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        release_on_cancel: bool = True,
        on_change: Callable[[bool], None] | None = None,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if not lease_duration_s > renew_deadline_s > retry_period_s > 0:
            raise ValueError("need lease_duration_s > renew_deadline_s > retry_period_s > 0")
        if lease_duration_s != int(lease_duration_s):
            # the Lease's leaseDurationSeconds is an integer: what peers see must be what
            # this elector's safety margins assume
            raise ValueError("lease_duration_s must be a whole number of seconds")
        if not identity:
            raise ValueError("identity must not be empty")
        self.api = api
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self.release_on_cancel = release_on_cancel
        self._on_change = on_change
        self._wall = wall
        self._monotonic = monotonic
        self._sleep = sleep
        self._renewed_at: float | None = None  # monotonic start of the last good renewal
        self._leading = False
        self._last: LeaseRecord | None = None  # the last record read or written
        self._path = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace, safe='')}/leases"

    # -- what the controller asks ------------------------------------------------------------
    def is_leader(self) -> bool:
        """True until ``renew_deadline_s`` after the last successful renewal started."""
        self._expire()
        return self._leading

    def safe_window_s(self) -> float:
        """Seconds an action started now may take and still end before any peer can take
        the lease over (0 when not leading)."""
        if not self.is_leader() or self._renewed_at is None:
            return 0.0
        return max(0.0, self._renewed_at + self.lease_duration_s - self._monotonic())

    @property
    def holder(self) -> str | None:
        """The holder in the last record seen (``None``: none seen yet or released)."""
        return (self._last.holder or None) if self._last is not None else None

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Try to acquire or renew every ``retry_period_s``, forever; release on cancel."""
        try:
            while True:
                await self.try_once()
                await self._sleep(self.retry_period_s)
        finally:
            if self.release_on_cancel and (self._leading or self.holder == self.identity):
                with anyio.CancelScope(shield=True):
                    await self.release()
            self._set_leading(False)

    async def try_once(self) -> bool:
        """One acquire-or-renew attempt (a 409 re-reads once); returns whether leading."""
        started = self._monotonic()
        budget = min(self.api.timeout_s, self.renew_deadline_s / 2)
        for _ in range(2):  # a lost race: re-read and judge again
            try:
                if await self._attempt(started, budget):
                    self._renewed_at = started
                    self._set_leading(True)
                    break
                self._set_leading(False)
                break
            except KubeConflict:
                log.info("lease %s/%s: lost a race (409), re-reading", self.namespace, self.name)
                continue
            except KubeError as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                break
        self._expire()
        return self._leading

    async def _attempt(self, started: float, budget_s: float) -> bool:
        record = await self._read(budget_s)
        self._last = record
        now = self._wall()
        verdict = judge(record, identity=self.identity, now=now)
        if verdict is Verdict.WAIT:
            return False
        remaining = budget_s - (self._monotonic() - started)
        new = claimed(record, identity=self.identity, now=now, duration_s=self.lease_duration_s)
        body = record_to_json(new, name=self.name, namespace=self.namespace)
        if verdict is Verdict.CREATE:
            answer = await self.api.request("POST", self._path, body=body, timeout_s=remaining)
        else:
            answer = await self.api.request(
                "PUT", f"{self._path}/{quote(self.name, safe='')}", body=body, timeout_s=remaining
            )
        self._last = record_from_json(answer)
        if verdict is not Verdict.RENEW:
            log.info("lease %s/%s: %s by %s", self.namespace, self.name, verdict, self.identity)
        return True

    async def _read(self, timeout_s: float) -> LeaseRecord | None:
        try:
            body = await self.api.request(
                "GET", f"{self._path}/{quote(self.name, safe='')}", timeout_s=timeout_s
            )
        except KubeNotFound:
            return None
        return record_from_json(body)

    async def release(self) -> bool:
        """Step down: clear the holder if the lease is still ours (bounded; errors logged)."""
        self._set_leading(False)
        self._renewed_at = None
        try:
            with anyio.fail_after(self.api.timeout_s * 2):
                record = await self._read(self.api.timeout_s)
                if record is None or record.holder != self.identity:
                    return False
                body = record_to_json(
                    released(record, now=self._wall()), name=self.name, namespace=self.namespace
                )
                await self.api.request("PUT", f"{self._path}/{quote(self.name, safe='')}",
                                       body=body)  # fmt: skip
        except (KubeError, TimeoutError) as exc:
            log.warning("lease %s/%s: release failed: %s", self.namespace, self.name, exc)
            return False
        log.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)
        return True

    def _expire(self) -> None:
        if self._leading and (
            self._renewed_at is None
            or self._monotonic() >= self._renewed_at + self.renew_deadline_s
        ):
            log.warning(
                "lease %s/%s: no renewal within %.1fs; %s stops leading",
                self.namespace, self.name, self.renew_deadline_s, self.identity,
            )  # fmt: skip
            self._set_leading(False)

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if not leading:
            self._renewed_at = None
        log.info("%s %s leading lease %s/%s", self.identity,
                 "started" if leading else "stopped", self.namespace, self.name)  # fmt: skip
        if self._on_change is not None:
            self._on_change(leading)
