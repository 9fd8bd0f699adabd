"""The endpoint registry: which engines exist, what they serve, whether they are healthy, and how
many requests the gateway has in flight on each.

Everything runs on one event loop, so plain attributes need no locks. Routing never sees an
:class:`EndpointState`: it gets the immutable :class:`routing.EndpointSnapshot` made by
``state.engine.snapshot()`` (:class:`routing.state.EngineState`), which merges the gateway's
own counters and EWMAs with the last scraped engine metrics.

Example::

    registry = EndpointRegistry()
    state = registry.add("http://127.0.0.1:8100")
    with state.lease(prompt_tokens=12) as lease:   # in-flight +1 until exit
        lease.first_token(ttft_s=0.05)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from routing import EndpointSnapshot
from routing.state import EngineState, Ticket


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


class EndpointState:
    """Per-engine state owned by the registry: health bookkeeping and model cards here, load
    counters and EWMAs in ``engine`` (a :class:`routing.state.EngineState`, which a metrics
    scraper feeds with ``engine.observe_metrics``)."""

    __slots__ = (
        "consecutive_failures",
        "consecutive_successes",
        "engine",
        "health",
        "id",
        "kv_events",
        "last_error",
        "models",
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
    ) -> None:
        self.id = endpoint_id
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
        ``cached_tokens`` is the expected prefix-cache hit (not queued as prefill work)."""
        ticket = self.engine.begin(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            cached_tokens=cached_tokens,
            seq=seq,
            placed=placed,
        )
        return Lease(self, ticket)

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
        self.engine.set_models(frozenset(card.id for card in self.models))

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
            **self._scraped(),
        }

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
    """The set of engines; add/remove at any time (in-flight leases keep their state object)."""

    def __init__(self) -> None:
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
        state = EndpointState(eid, url.rstrip("/"), models, api_key=api_key, kv_events=kv_events)
        self._states[eid] = state
        self._version += 1
        return state

    def remove(self, endpoint_id: str) -> EndpointState:
        self._version += 1
        return self._states.pop(endpoint_id)

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

    def snapshots(self) -> list[EndpointSnapshot]:
        return [state.snapshot() for state in self._states.values()]

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
    """

    __slots__ = ("_ticket", "state")

    def __init__(self, state: EndpointState, ticket: Ticket) -> None:
        self.state = state
        self._ticket = ticket

    @property
    def first_token_seen(self) -> bool:
        return self._ticket.started

    def first_token(self, *, ttft_s: float) -> None:
        """The first generated text arrived (the prefill is no longer queued work)."""
        self.state.engine.first_token(self._ticket, ttft_s=ttft_s)

    def tokens(self, *, n: int, itl_s: float | None = None) -> None:
        self.state.engine.tokens(self._ticket, n=n, itl_s=itl_s)

    def release(self) -> None:
        self.state.engine.finish(self._ticket)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
