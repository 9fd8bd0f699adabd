"""Kubernetes pod discovery: the engine pool follows the pods of a label selector.

Flow: list the pods (``GET /api/v1/namespaces/{ns}/pods?labelSelector=``), reconcile the
endpoint registry (:func:`gateway.pods.reconcile`: Ready pods added, gone / not-ready /
terminating ones removed), then watch from the list's resourceVersion and apply each event
as it arrives. A watch the server ends after ``watch_timeout_s`` is opened again from the
last resourceVersion; a ``410 Gone`` (the HTTP status or an ERROR event), a cut stream
(broken, or ended cleanly well before its timeout) or any other API error makes discovery
list again, after a capped exponential backoff with jitter. API errors never remove an
engine: the last known set serves until a list succeeds. Only engines discovery added are
removed by it (``engines:`` are never touched); a pod named like a static engine is
skipped, with a warning.

The official ``kubernetes`` client is synchronous: every call runs in a worker thread
(:func:`anyio.to_thread.run_sync`, at most ``_THREADS`` at once), each bounded by
``request_timeout_s`` (a watch's read by ``watch_timeout_s`` more), so the event loop never
blocks on the API. A cancelled watch is abandoned by the loop at once and its socket shut
down, which ends the reading thread too (:meth:`PodWatch.stop`).

The I/O sits behind the :class:`PodApi` seam (:class:`KubeApi` is the real one) and reads
wire JSON, never ``V1Pod`` models. Newly added engines are handed to ``on_added`` (the
gateway probes their health at once) and removed ones to ``on_removed`` (the router forgets
them).

Example::

    discovery = KubernetesDiscovery(settings.discovery, endpoints=registry)
    await discovery.sync_once()
    tg.start_soon(supervise, "discovery", discovery.run)
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import orjson
import urllib3
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from autoscale.kube import KubeError, kube_configuration
from gateway.endpoints import EndpointRegistry, EndpointState
from gateway.metricspec import Label, MetricSpec
from gateway.pods import (
    DELETED,
    Change,
    PodEndpoint,
    PodRules,
    PodVerdict,
    pod_name,
    pod_verdict,
    reconcile,
)
from gateway.settings import DiscoverySettings

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = [
    "ApiError",
    "DiscoveryCollector",
    "DiscoveryError",
    "DiscoveryStats",
    "Gone",
    "KubeApi",
    "KubernetesDiscovery",
    "METRICS",
    "PodApi",
    "PodList",
    "PodWatch",
    "WatchCut",
]

log = logging.getLogger(__name__)

_THREADS = 4
"""Worker threads discovery may hold: one call at a time, plus watches being abandoned."""
_EARLY_END = 0.9
"""A watch the server ends cleanly before this share of its timeoutSeconds counts as cut."""
_EVENT_TYPES = frozenset({"added", "modified", "deleted", "bookmark", "error"})
_RELIST_REASONS = ("gone", "cut", "error")
_KUBERNETES = "discovery.kind: kubernetes"


def _watch_seconds(s: DiscoverySettings) -> int:
    """The watch's ``timeoutSeconds`` (whole seconds): what the server ends it after, and so
    what an early end is measured against."""
    return max(1, round(s.watch_timeout_s))


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("switchyard_discovery_endpoints", "gauge", "endpoints", when=_KUBERNETES),
    MetricSpec("switchyard_discovery_events_total", "counter", "events",
               (Label("type", values=(*sorted(_EVENT_TYPES), "other")),), when=_KUBERNETES),
    MetricSpec("switchyard_discovery_relists_total", "counter", "relists",
               (Label("reason", values=_RELIST_REASONS),), when=_KUBERNETES),
    MetricSpec("switchyard_discovery_errors_total", "counter", "errors", when=_KUBERNETES),
)  # fmt: skip


# -- errors: mapped once, in KubeApi ---------------------------------------------------------
# DiscoveryError
#  +-- Gone       410: the resourceVersion is too old; list again
#  +-- WatchCut   the stream broke mid-way (not a clean end); list again
#  +-- ApiError   any other answer or transport failure; list again after a backoff
class DiscoveryError(Exception):
    """A failed Kubernetes API call (see the tree above)."""


class Gone(DiscoveryError):
    pass


class WatchCut(DiscoveryError):
    pass


class ApiError(DiscoveryError):
    pass


@dataclass(frozen=True, slots=True)
class PodList:
    items: tuple[Mapping[str, Any], ...]
    resource_version: str


class PodWatch(Protocol):
    def next_event(self) -> Mapping[str, Any] | None:
        """Blocks for the next event (wire JSON); None when the server ended the stream."""
        ...

    def stop(self) -> None:
        """Ends the stream now, from any thread (a blocked :meth:`next_event` returns)."""
        ...


class PodApi(Protocol):
    """The blocking calls discovery makes (run in worker threads)."""

    def list_pods(self) -> PodList: ...

    def watch_pods(self, resource_version: str) -> PodWatch: ...

    def close(self) -> None: ...


class KubeApi:
    """:class:`PodApi` on the official client, built lazily (the kubeconfig is read in the
    first call's worker thread). ``open_watches`` counts streams not yet closed, ``watches``
    every stream opened.

    :meth:`close` may run while an abandoned worker thread is still inside a call (a cancelled
    discovery does not wait for its threads): it stops every open stream, and a stream or a
    client that such a thread makes after it is closed at once (the call raises
    :class:`ApiError`), so no socket outlives the close."""

    def __init__(self, settings: DiscoverySettings) -> None:
        self._settings = settings
        self._core: Any = None
        self._api: Any = None
        self._lock = threading.Lock()  # close() against streams and the client being made
        self._closed = False
        self._streams: set[_Stream] = set()
        self.open_watches = 0
        self.watches = 0

    def _client(self) -> Any:
        if self._closed:
            raise ApiError("discovery is closed")
        if self._core is None:
            # The import costs ~0.3 s: only when used.
            from kubernetes import client

            s = self._settings
            try:  # retries off: our loop retries, with its backoff; urllib3's would hide it
                cfg = kube_configuration(s.kubeconfig, context=s.context)
            except KubeError as exc:
                raise ApiError(f"cannot load the Kubernetes config: {exc}") from exc
            api: Any = client.ApiClient(cfg)
            with self._lock:
                closed, made = self._closed, self._api is not None
                if not closed and not made:
                    self._api, self._core = api, client.CoreV1Api(api)
            if closed or made:  # closed meanwhile, or another thread made one first
                api.close()
            if closed:
                raise ApiError("discovery is closed")
        return self._core

    def list_pods(self) -> PodList:
        s = self._settings
        with _mapped():
            resp = self._client().list_namespaced_pod(
                s.namespace,
                label_selector=s.selector,
                _preload_content=False,
                _request_timeout=s.request_timeout_s,
            )
            try:
                body = orjson.loads(resp.data)
            finally:
                resp.release_conn()
        self._raise_if_closed()  # closed while this (abandoned) call ran
        items = body.get("items") if isinstance(body, dict) else None
        meta = body.get("metadata") if isinstance(body, dict) else None
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(items, list) or not isinstance(rv, str):
            raise ApiError("the pod list has no items or no resourceVersion")
        return PodList(tuple(i for i in items if isinstance(i, dict)), rv)

    def watch_pods(self, resource_version: str) -> PodWatch:
        s = self._settings
        with _mapped():
            resp = self._client().list_namespaced_pod(
                s.namespace,
                label_selector=s.selector,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=_watch_seconds(s),
                _preload_content=False,
                # Connect, then the longest gap between two reads: a server that forgets to end
                # the watch ends it here.
                _request_timeout=(s.request_timeout_s, s.watch_timeout_s + s.request_timeout_s),
            )
        stream = _Stream(resp, self)
        with self._lock:
            closed = self._closed
            if not closed:
                self._streams.add(stream)
        if closed:  # opened by a thread the closed discovery abandoned
            stream.stop()
            self._raise_if_closed()
        return stream

    def _raise_if_closed(self) -> None:
        """After a call: if :meth:`close` ran meanwhile, close the client again (the call may
        have opened a connection pool after the first close) and raise :class:`ApiError`."""
        with self._lock:
            api = self._api if self._closed else None
            closed = self._closed
        if api is not None:
            api.close()
        if closed:
            raise ApiError("discovery is closed")

    def _ended(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.discard(stream)
            self.open_watches -= 1

    def close(self) -> None:
        """Stop every open watch and close the client (see the class docstring)."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
            api = self._api
        for stream in streams:
            stream.stop()
        if api is not None:
            api.close()


class _Stream:
    """One watch response read line by line (``kubernetes.watch`` without its model
    deserialisation and its global client)."""

    def __init__(self, resp: Any, owner: KubeApi) -> None:
        self._resp = resp
        self._owner = owner
        self._lines = self._read()
        self._closed = False
        self._lock = threading.Lock()  # the reading thread and stop() may both close
        with owner._lock:
            owner.open_watches += 1
            owner.watches += 1

    def _read(self) -> Iterator[bytes]:
        buffer = b""
        for chunk in self._resp.stream(amt=None, decode_content=False):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            yield from (line for line in lines if line.strip())

    def next_event(self) -> Mapping[str, Any] | None:
        try:
            with _mapped(cut=True):
                line = next(self._lines, None)
        except DiscoveryError:
            self._close()
            raise
        if line is None:
            self._close()
            return None
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self._close()
            raise WatchCut(f"undecodable watch event: {exc}") from exc
        return event if isinstance(event, dict) else {}

    def stop(self) -> None:
        # Shut the socket down first: a thread blocked reading it returns at once (close()
        # alone can wait on that read). Then close the response.
        sock = getattr(getattr(self._resp, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the other side
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._owner._ended(self)
        try:
            self._resp.close()
            self._resp.release_conn()
        except Exception:  # noqa: BLE001 - best effort on a socket being torn down
            log.debug("closing a watch stream failed", exc_info=True)


class _mapped:
    """Maps the client's and urllib3's exceptions to :class:`DiscoveryError` (one place)."""

    def __init__(self, *, cut: bool = False) -> None:
        self._cut = cut

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:  # fmt: skip
        if exc is None or isinstance(exc, DiscoveryError):
            return
        from kubernetes.client.exceptions import ApiException

        if isinstance(exc, ApiException):
            if exc.status == 410:
                raise Gone(f"410 {exc.reason}") from exc
            raise ApiError(f"{exc.status} {exc.reason}") from exc
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError) and self._cut:
            raise WatchCut("no event nor end within the watch's read timeout") from exc
        if isinstance(exc, urllib3.exceptions.HTTPError | OSError | ValueError):
            kind = WatchCut if self._cut else ApiError
            raise kind(f"{type(exc).__name__}: {exc}") from exc


@dataclass(slots=True)
class DiscoveryStats:
    """Counts behind the ``switchyard_discovery_*`` metrics."""

    events: Counter[str] = field(default_factory=Counter)
    relists: Counter[str] = field(default_factory=Counter)
    errors: int = 0


class KubernetesDiscovery:
    """Keeps the registry's discovered engines equal to the Ready pods; see the module
    docstring. ``api``: the seam (default :class:`KubeApi` on ``settings``); ``rng``: the
    backoff's jitter."""

    def __init__(
        self,
        settings: DiscoverySettings,
        *,
        endpoints: EndpointRegistry,
        api: PodApi | None = None,
        on_added: Callable[[EndpointState], Coroutine[Any, Any, None]] | None = None,
        on_removed: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.api: PodApi = api if api is not None else KubeApi(settings)
        self._endpoints = endpoints
        self._on_added = on_added
        self._on_removed = on_removed
        self._rng = rng or random.Random()
        self._clock = clock
        self._rules = PodRules(
            model_label=settings.model_label,
            port_annotation=settings.port_annotation,
            default_port=settings.default_port,
            scheme=settings.scheme,
            kv_events_annotation=settings.kv_events_annotation,
        )
        self._limiter = anyio.CapacityLimiter(_THREADS)
        self.owned: dict[str, PodEndpoint] = {}  # engines this discovery registered
        self._clashes: set[str] = set()  # pods named like a static engine (warned once)
        self._resource_version: str | None = None
        self._failures = 0  # consecutive; sets the backoff
        self.listed = False  # a list has succeeded once: the pool is known (``/ready``)
        self.stats = DiscoveryStats()

    # -- the loop ---------------------------------------------------------------------------
    async def sync_once(self) -> bool:
        """List and reconcile once (the gateway does this before serving, then probes every
        engine); False on an API error (logged, counted; nothing removed)."""
        return await self._list(None)

    async def _list(self, tg: TaskGroup | None) -> bool:
        """List and reconcile; engines added are handed to ``on_added`` in ``tg``."""
        try:
            pods = await self._call(self.api.list_pods)
        except DiscoveryError as exc:
            self._failed("list", exc)
            return False
        self._resource_version = pods.resource_version
        verdicts = [pod_verdict(pod, self._rules) for pod in pods.items]
        self._added(self._apply(reconcile(self.owned, verdicts, complete=True)), tg)
        self.listed = True
        return True

    async def run(self) -> None:
        """List then watch, forever (a supervised task); engines added here are handed to
        ``on_added`` in tasks of this loop."""
        async with anyio.create_task_group() as tg:
            while True:
                if self._resource_version is None:
                    await anyio.sleep(self._backoff_s())
                    if not await self._list(tg):
                        continue
                await self._watch(tg)

    async def _watch(self, tg: TaskGroup) -> None:
        """One watch, from the last resourceVersion, until it ends; on a failure the
        resourceVersion is dropped (the loop lists again)."""
        rv = self._resource_version
        assert rv is not None
        try:
            stream = await self._call(self.api.watch_pods, rv)
        except DiscoveryError as exc:
            self._relist(exc)
            return
        opened = self._clock()
        try:
            while True:
                try:
                    event = await self._call(stream.next_event)
                except DiscoveryError as exc:
                    self._relist(exc)
                    return
                if event is None:
                    # The server's timeoutSeconds: watch again from here. Much sooner, the
                    # server cut it (a restart, a broken proxy): list again, as after a cut.
                    if self._clock() - opened < _EARLY_END * _watch_seconds(self.settings):
                        self._relist(WatchCut("the server ended the watch early"))
                    else:
                        self._failures = 0
                    return
                self._event(event, tg)
                if self._resource_version is None:
                    return
        finally:
            stream.stop()

    def _event(self, event: Mapping[str, Any], tg: TaskGroup) -> None:
        kind = str(event.get("type", "")).lower()
        self.stats.events[kind if kind in _EVENT_TYPES else "other"] += 1
        obj = event.get("object")
        obj = obj if isinstance(obj, Mapping) else {}
        if kind == "error":
            code = obj.get("code")
            self._relist(Gone("410 in an ERROR event") if code == 410 else
                         ApiError(f"ERROR event: {code} {obj.get('message')}"))  # fmt: skip
            return
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        if isinstance(rv, str) and rv:
            self._resource_version = rv
        self._failures = 0  # the watch works
        if kind in ("added", "modified"):
            changes = reconcile(self.owned, [pod_verdict(obj, self._rules)], complete=False)
        elif kind == "deleted":
            gone = PodVerdict(pod_name(obj), None, DELETED)
            changes = reconcile(self.owned, [gone], complete=False)
        else:
            return
        self._added(self._apply(changes), tg)

    def _added(self, states: list[EndpointState], tg: TaskGroup | None) -> None:
        if self._on_added is not None and tg is not None:
            for state in states:
                tg.start_soon(self._on_added, state)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn`` in a worker thread; cancelled, the loop goes on at once (the thread ends
        on its own bounds, or sooner once the watch is stopped)."""
        return await anyio.to_thread.run_sync(
            fn, *args, abandon_on_cancel=True, limiter=self._limiter
        )

    # -- bookkeeping --------------------------------------------------------------------------
    def _relist(self, exc: DiscoveryError) -> None:
        gone, cut, error = _RELIST_REASONS
        reason = gone if isinstance(exc, Gone) else cut if isinstance(exc, WatchCut) else error
        self.stats.relists[reason] += 1
        self._failed("watch", exc)
        self._resource_version = None

    def _failed(self, call: str, exc: DiscoveryError) -> None:
        self._failures += 1
        if not isinstance(exc, Gone | WatchCut):
            self.stats.errors += 1
        log.warning("kubernetes discovery: %s failed (%s); listing again in about %.2fs, "
                    "keeping the %d engines known", call, exc, self._peek_backoff_s(),
                    len(self.owned))  # fmt: skip

    def _peek_backoff_s(self) -> float:
        s = self.settings
        if self._failures <= 0:
            return 0.0
        return min(s.backoff_max_s, s.backoff_initial_s * 2.0 ** min(self._failures - 1, 30))

    def _backoff_s(self) -> float:
        """The capped exponential backoff of the consecutive failures, with jitter (half to
        all of it), so replicas do not list in lockstep."""
        return self._peek_backoff_s() * self._rng.uniform(0.5, 1.0)

    def _apply(self, changes: list[Change]) -> list[EndpointState]:
        """Apply ``changes`` to the registry; returns the states added."""
        added: list[EndpointState] = []
        for change in changes:
            ep = change.endpoint
            if change.op == "remove":
                if (
                    self.owned.pop(ep.id, None) is not None
                    and self._endpoints.get(ep.id) is not None
                ):
                    self._endpoints.remove(ep.id)
                    if self._on_removed is not None:
                        self._on_removed(ep.id)
                    log.info("kubernetes discovery: removed engine %s (%s): %s",
                             ep.id, ep.url, change.reason)  # fmt: skip
                continue
            if self._endpoints.get(ep.id) is not None:
                if ep.id not in self._clashes:
                    self._clashes.add(ep.id)
                    log.warning("kubernetes discovery: pod %s is named like a configured "
                                "engine; skipped", ep.id)  # fmt: skip
                continue
            added.append(
                self._endpoints.add(
                    ep.url, endpoint_id=ep.id, models=ep.models, kv_events=ep.kv_events
                )
            )
            self.owned[ep.id] = ep
            log.info("kubernetes discovery: added engine %s (%s, models %s): %s",
                     ep.id, ep.url, list(ep.models), change.reason)  # fmt: skip
        return added

    def close(self) -> None:
        self.api.close()

    def collector(self) -> Collector:
        return DiscoveryCollector(self)


class DiscoveryCollector(Collector):
    """``switchyard_discovery_*``, read at scrape time."""

    def __init__(self, discovery: KubernetesDiscovery) -> None:
        self._discovery = discovery

    def collect(self) -> Iterator[Metric]:
        d = self._discovery
        yield GaugeMetricFamily(
            "switchyard_discovery_endpoints",
            "Engines registered from Kubernetes pods",
            value=len(d.owned),
        )
        events = CounterMetricFamily(
            "switchyard_discovery_events", "Pod watch events by type", labels=["type"]
        )
        for kind, n in sorted(d.stats.events.items()):
            events.add_metric([kind], n)
        yield events
        relists = CounterMetricFamily(
            "switchyard_discovery_relists",
            "Pod lists after the first, by reason (gone: 410; cut: a broken watch; error)",
            labels=["reason"],
        )
        for reason, n in sorted(d.stats.relists.items()):
            relists.add_metric([reason], n)
        yield relists
        yield CounterMetricFamily(
            "switchyard_discovery_errors",
            "Failed Kubernetes API calls (lists, watches) other than 410 and cut watches",
            value=d.stats.errors,
        )
