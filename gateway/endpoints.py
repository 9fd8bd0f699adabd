"""The endpoint registry: which engines exist, what they serve, whether they are healthy, and how
many requests the gateway has in flight on each.

Everything runs on one event loop, so plain attributes need no locks. Routing never sees an
:class:`EndpointState`: it gets the immutable :class:`routing.EndpointSnapshot` made by
``state.engine.snapshot()`` (:class:`routing.state.EngineState`), which merges the gateway's
own counters and EWMAs with the last scraped engine metrics.

Each engine also has a passive :class:`gateway.outliers.OutlierDetector` (ejection after
consecutive failed attempts, half-open probing), all made by the registry's one
:class:`gateway.outliers.Outliers` pool (the ejection cap, the retry budget, slowness).
Routing sees an engine only when it is healthy and :meth:`EndpointState.routable`;
:meth:`EndpointRegistry.routable` drops the others (nothing to do, and no cost, while no
engine is out). A :class:`Lease` reports its attempt's outcome (:meth:`Lease.passed`,
:meth:`Lease.failed`) and, when it is released, calls the registry's ``on_release`` hook
(admission control wakes a waiting request there).

Example::

    registry = EndpointRegistry()
    state = registry.add("http://127.0.0.1:8100")
    with state.lease(prompt_tokens=12) as lease:   # in-flight +1 until exit
        lease.first_token(ttft_s=0.05)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from gateway.outliers import LatencyView, OutlierDetector, Outliers, Phase
from gateway.settings import OutlierSettings
from routing import EndpointSnapshot
from routing.state import EngineState, Ticket

log = logging.getLogger(__name__)


class Health(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class ModelCard:
    """One ``/v1/models`` entry of an engine; ``parent`` is set for LoRA adapters."""

    id: str
    parent: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    def target(self) -> tuple[str, str | None]:
        """``(base model, adapter or None)``: an adapter routes as itself on its parent."""
        return (self.parent, self.id) if self.parent else (self.id, None)


class Pool:
    """What a registry shares with its engines: the outlier pool, the count of leases alive
    (admission's global cap) and the hook called when one is released."""

    __slots__ = ("leases", "on_release", "outliers")

    def __init__(self, outliers: Outliers) -> None:
        self.outliers = outliers
        self.leases = 0
        self.on_release: Callable[[], None] | None = None


class EndpointState:
    """Per-engine state owned by the registry: health bookkeeping and model cards here, load
    counters and EWMAs in ``engine`` (a :class:`routing.state.EngineState`, which a metrics
    scraper feeds with ``engine.observe_metrics``), passive ejection in ``outlier``."""

    __slots__ = (
        "consecutive_failures",
        "consecutive_successes",
        "engine",
        "health",
        "id",
        "kv_events",
        "last_error",
        "models",
        "outlier",
        "pool",
        "static_models",
        "upstream_headers",
        "url",
        "version",
    )

    def __init__(
        self,
        endpoint_id: str,
        url: str,
        static_models: Iterable[str] = (),
        *,
        api_key: str | None = None,
        kv_events: str | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.id = endpoint_id
        # A registry passes its pool; a lone state (tests) gets one of its own.
        self.pool = pool or Pool(Outliers(OutlierSettings(), clock=time.monotonic))
        self.outlier: OutlierDetector = self.pool.outliers.detector()
        self.url = url
        self.kv_events = kv_events  # the engine's KV-event PUB endpoint (tcp://...), if any
        # Sent with every request to this engine (vLLM's --api-key); never logged or shown.
        self.upstream_headers: dict[str, str] = (
            {"authorization": f"Bearer {api_key}"} if api_key else {}
        )
        self.engine = EngineState(endpoint_id, url)
        self.version = 0  # bumped when health or models change (the registry's catalog cache)
        self.static_models = tuple(static_models)
        self.models: tuple[ModelCard, ...] = ()
        self.health = Health.UNKNOWN
        self.engine.set_health(False)
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.last_error: str | None = None
        self.set_models(())

    def lease(
        self,
        *,
        prompt_tokens: int = 0,
        max_tokens: int | None = None,
        cached_tokens: int = 0,
        seq: int | None = None,
        placed: bool = False,
    ) -> Lease:
        """Count one request in flight here until the lease is released (see :class:`Lease`);
        ``cached_tokens`` is the expected prefix-cache hit (not queued as prefill work). On a
        half-open engine the lease is its one probe."""
        ticket = self.engine.begin(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            cached_tokens=cached_tokens,
            seq=seq,
            placed=placed,
        )
        self.pool.leases += 1
        outlier = self.outlier
        return Lease(self, ticket, probe=outlier.phase is not Phase.CLOSED and outlier.take_probe())

    def routable(self) -> bool:
        """Not ejected, nor half-open with its probe already out (health is separate)."""
        return self.outlier.routable()

    @property
    def healthy(self) -> bool:
        return self.health is Health.HEALTHY

    @property
    def in_flight(self) -> int:
        return self.engine.snapshot().in_flight

    def record_probe(
        self, ok: bool, *, fail_threshold: int, success_threshold: int, error: str | None = None
    ) -> bool:
        """Count one health outcome; returns True when the health state changed."""
        before = self.health
        if ok:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            self.last_error = None
            if self.health is Health.UNKNOWN or self.consecutive_successes >= success_threshold:
                self.health = Health.HEALTHY
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            self.last_error = error
            if self.health is Health.UNKNOWN or self.consecutive_failures >= fail_threshold:
                self.health = Health.UNHEALTHY
        self.engine.set_health(self.healthy)
        if self.health is not before:
            self.version += 1
        return self.health is not before

    def set_models(self, cards: Iterable[ModelCard]) -> None:
        cards = tuple(cards)
        self.models = cards if cards else tuple(ModelCard(m) for m in self.static_models)
        self.version += 1
        self.engine.set_models(
            frozenset(card.id for card in self.models),
            adapters=frozenset(card.id for card in self.models if card.parent),
        )

    def snapshot(self) -> EndpointSnapshot:
        return self.engine.snapshot()

    def base_model(self) -> str | None:
        """The first served model that is not a LoRA adapter (seeds KV-event hashes)."""
        return next((card.id for card in self.models if not card.parent), None)

    def describe(self) -> dict[str, Any]:
        """JSON-able detail for ``/ready`` and the admin API."""
        return {
            "id": self.id,
            "url": self.url,
            "health": self.health.value,
            "in_flight": self.in_flight,
            "models": [card.id for card in self.models],
            "last_error": self.last_error,
            "outlier": self._outlier(),
            "slow": self.engine.snapshot().slow,
            **self._scraped(),
        }

    def _outlier(self) -> dict[str, Any]:
        outlier = self.outlier
        outlier.routable()  # an ejection whose time is up shows as half-open
        detail: dict[str, Any] = {"state": outlier.phase.value, "ejections": outlier.ejections}
        if outlier.phase is Phase.EJECTED:
            detail["remaining_s"] = round(outlier.remaining_s(), 3)
        return detail

    def _scraped(self) -> dict[str, Any]:
        snap = self.engine.snapshot()
        if snap.scraped_at is None:
            return {}
        return {"running": snap.running, "waiting": snap.waiting, "kv_usage": snap.kv_usage}


def default_endpoint_id(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model as the gateway lists it: the card from the first engine that serves it."""

    card: ModelCard
    endpoints: tuple[str, ...]
    healthy: bool


class EndpointRegistry:
    """The set of engines; add/remove at any time (in-flight leases keep their state object).
    ``outliers`` configures passive ejection, the retry budget and slowness (defaults when
    omitted); ``clock`` is theirs (monotonic seconds)."""

    def __init__(
        self,
        outliers: OutlierSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outliers = Outliers(outliers or OutlierSettings(), clock=clock)
        self.pool = Pool(self.outliers)
        self._states: dict[str, EndpointState] = {}
        self._seq = 0
        self._version = 0  # bumped by add/remove
        self._catalog: tuple[tuple[int, ...], dict[str, ModelEntry]] | None = None

    def add(
        self,
        url: str,
        *,
        endpoint_id: str | None = None,
        models: Iterable[str] = (),
        api_key: str | None = None,
        kv_events: str | None = None,
    ) -> EndpointState:
        eid = endpoint_id or default_endpoint_id(url)
        if eid in self._states:
            raise KeyError(f"endpoint {eid!r} already registered")
        state = EndpointState(
            eid, url.rstrip("/"), models, api_key=api_key, kv_events=kv_events, pool=self.pool
        )
        self._states[eid] = state
        self._version += 1
        return state

    def remove(self, endpoint_id: str) -> EndpointState:
        state = self._states.pop(endpoint_id)
        self._version += 1
        self.outliers.retire(state.outlier)
        return state

    def get(self, endpoint_id: str) -> EndpointState | None:
        return self._states.get(endpoint_id)

    def __iter__(self) -> Iterator[EndpointState]:
        return iter(list(self._states.values()))

    def __len__(self) -> int:
        return len(self._states)

    def next_seq(self) -> int:
        """A gateway-wide monotone counter for ``RouteRequest.seq``."""
        self._seq += 1
        return self._seq

    def advance_seq(self, by: int) -> None:
        """Skip ``by`` sequence numbers. Replicas start at a random offset so that their
        seq-derived tie-breaks differ (two replicas' n-th requests would otherwise break
        ties alike and pile onto one engine); differences of seqs, all that decay reads,
        are unchanged."""
        self._seq += max(0, by)

    def snapshots(self) -> list[EndpointSnapshot]:
        return [state.snapshot() for state in self._states.values()]

    def routable(self, snapshots: list[EndpointSnapshot]) -> list[EndpointSnapshot]:
        """``snapshots`` without the engines that are ejected or half-open with their probe
        out; the same list, at no cost, while no engine is out."""
        if not self.outliers.out:
            return snapshots
        states = self._states
        return [s for s in snapshots if (st := states.get(s.id)) is None or st.routable()]

    @property
    def leases(self) -> int:
        """Leases alive: attempts this process has in flight on any engine."""
        return self.pool.leases

    def check_slow(self) -> frozenset[str]:
        """Re-judge which engines are slow (:class:`gateway.outliers.SlowDetector`) and set
        the verdict in their snapshots; returns the slow ones."""
        states = list(self._states.values())
        views = []
        for state in states:
            ttft, samples = state.engine.ttft
            views.append(LatencyView(state.id, state.engine.snapshot().models, state.healthy,
                                     ttft, samples))  # fmt: skip
        slow = self.outliers.slow.update(views)
        for state in states:
            is_slow = state.id in slow
            if is_slow != state.engine.snapshot().slow:
                if is_slow:
                    log.warning("engine %s is slow: routing avoids it while others serve",
                                state.id)  # fmt: skip
                else:
                    log.info("engine %s is no longer judged slow", state.id)
            state.engine.set_slow(is_slow)
        return slow

    async def run_slow_checks(self) -> None:
        """Judge slowness every ``outliers.slow_check_s``, forever (a supervised task)."""
        while True:
            await asyncio.sleep(self.outliers.settings.slow_check_s)
            self.check_slow()

    def any_healthy(self) -> bool:
        return any(state.healthy for state in self._states.values())

    def catalog(self) -> dict[str, ModelEntry]:
        """Every model/adapter any engine has listed, with which engines list it. Cached until
        an engine is added or removed or changes health or models (read on every request)."""
        key = (self._version, *(state.version for state in self._states.values()))
        if self._catalog is not None and self._catalog[0] == key:
            return self._catalog[1]
        out: dict[str, ModelEntry] = {}
        for state in self._states.values():
            for card in state.models:
                entry = out.get(card.id)
                if entry is None:
                    out[card.id] = ModelEntry(card, (state.id,), state.healthy)
                else:
                    out[card.id] = replace(
                        entry,
                        endpoints=(*entry.endpoints, state.id),
                        healthy=entry.healthy or state.healthy,
                    )
        self._catalog = (key, out)
        return out


class Lease:
    """One request's hold on one engine: what the proxy reports while it relays the answer.

    Bound to its engine, so the proxy never touches :mod:`routing.state` itself. Released
    exactly once, however the attempt ends (``with`` block exit, or :meth:`release`).
    ``probe``: this attempt is its half-open engine's one probe (its outcome decides).
    """

    __slots__ = ("_ticket", "probe", "state")

    def __init__(self, state: EndpointState, ticket: Ticket, *, probe: bool = False) -> None:
        self.state = state
        self._ticket = ticket
        self.probe = probe

    @property
    def first_token_seen(self) -> bool:
        return self._ticket.started

    def first_token(self, *, ttft_s: float) -> None:
        """The first generated text arrived (the prefill is no longer queued work)."""
        self.state.engine.first_token(self._ticket, ttft_s=ttft_s)

    def tokens(self, *, n: int, itl_s: float | None = None) -> None:
        self.state.engine.tokens(self._ticket, n=n, itl_s=itl_s)

    def passed(self) -> None:
        """The engine answered < 500 (a success for outlier detection)."""
        self.state.outlier.success(probe=self.probe)

    def failed(self) -> None:
        """The attempt failed: a 5xx, a connect error, a timeout. Logs an ejection."""
        state = self.state
        if state.outlier.failure(probe=self.probe):
            log.warning(
                "engine %s ejected for %.1fs after failed attempts (ejection %d)",
                state.id,
                state.outlier.remaining_s(),
                state.outlier.ejections,
            )

    def release(self) -> None:
        ticket = self._ticket
        if ticket.done:
            return
        state = self.state
        state.engine.finish(ticket)
        pool = state.pool
        pool.leases -= 1
        if self.probe:
            state.outlier.probe_ended()
        if pool.on_release is not None:
            pool.on_release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
