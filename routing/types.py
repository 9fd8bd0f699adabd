"""Data types every policy sees: the request's routing fields and endpoint snapshots.

Policies are pure: they get a :class:`RouteRequest` and a sequence of immutable
:class:`EndpointSnapshot` values and return a ranking. All I/O (scraping ``/metrics``,
KV events, prefix-index lookups) happens before the call and lands in these values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """The fields of one request that routing may look at.

    ``seq`` is a gateway-wide monotone counter (round-robin and tie-breaks derive from it, so
    policies need no mutable state); ``prefix_blocks`` maps endpoint id to the number of the
    request's leading blocks that endpoint is believed to hold, looked up before routing.

    Example: ``RouteRequest(model="llama", seq=7, prompt_tokens=900)``.
    """

    model: str
    seq: int = 0
    adapter: str | None = None
    prompt_tokens: int = 0
    max_tokens: int | None = None
    block_hashes: tuple[int, ...] = ()
    block_tokens: int = 16
    prefix_blocks: Mapping[str, int] = field(default_factory=dict)
    tier_blocks: int = 0
    """Leading blocks of ``block_hashes`` the shared KV tier holds (gateway/kvtier.py): any
    engine can load them instead of recomputing them (docs/kvtier.md)."""
    session_key: str | None = None
    user: str | None = None
    stream: bool = False
    fairness: FairnessView | None = None
    """The requesting user's virtual-token standing (VTC), filled by the gateway's counters."""


@dataclass(frozen=True, slots=True)
class EndpointSnapshot:
    """One engine's state at routing time (gateway counters + last scrape).

    Example: ``EndpointSnapshot(id="e1", url="http://127.0.0.1:8001", models=frozenset({"m"}))``.
    """

    id: str
    url: str
    models: frozenset[str] = frozenset()
    healthy: bool = True
    in_flight: int = 0
    in_flight_tokens: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    ttft_ewma_s: float | None = None
    itl_ewma_s: float | None = None
    max_num_seqs: int | None = None
    scraped_at: float | None = None
    prefill_tokens: int = 0
    """Prompt tokens we sent that have not produced a first token yet (queued prefill work)."""
    block_size: int | None = None
    """The engine's KV block size in tokens (``vllm:cache_config_info``), when known."""
    running_adapters: frozenset[str] = frozenset()
    """LoRA adapters with requests running or waiting (``vllm:lora_requests_info``)."""
    adapters: frozenset[str] = frozenset()
    """LoRA adapters loaded on the engine (``/v1/models`` entries with a ``parent``); also in
    ``models``. A loaded but idle adapter is here and not in ``running_adapters``."""
    loading_adapters: frozenset[str] = frozenset()
    """LoRA adapters the gateway is loading onto this engine right now (not yet in ``models``)."""
    max_loras: int | None = None
    """LoRA slots: ``max_lora`` of ``vllm:lora_requests_info`` when scraped, else the configured
    value (:meth:`routing.state.EngineState.set_lora_slots`); ``None``: unknown (no free-slot
    claims are made for this engine)."""
    recent_routed: float = 0.0
    """Requests routed here, exponentially decayed per request routed anywhere (window
    :data:`RECENT_WINDOW`), as of ``last_routed_seq``; see :func:`recent_routed_at`. It is
    this endpoint's recent traffic share: unlike in-flight counts it remembers sticky work
    between turns (a session thinking, a prefix group between arrivals)."""
    recent_placed: float = 0.0
    """Of ``recent_routed``, the placements (:func:`is_placement`): requests that started a
    new sticky prefix here -- a new prefix group, a new session -- rather than following one.
    Decayed like ``recent_routed`` (same ``last_routed_seq``); see :func:`recent_placed_at`."""
    last_routed_seq: int = -1
    """``RouteRequest.seq`` of the last request routed here (-1: none yet). Pickers break
    ties least-recently-routed first, so tied (cold, idle) traffic rotates over endpoints
    even one request at a time; on ties alone a newly added endpoint gets one turn, not a
    burst (the prefix-cache balance term then lets it catch up to its share)."""
    slow: bool = False
    """The gateway judged this engine slow: its TTFT EWMA is well above its peers' median
    (:mod:`gateway.outliers`). :class:`routing.filters.NotSlow` avoids it while others remain."""

    @property
    def free_lora_slots(self) -> int:
        """LoRA slots neither loaded nor being loaded (0 when ``max_loras`` is unknown)."""
        if self.max_loras is None:
            return 0
        return max(0, self.max_loras - len(self.adapters | self.loading_adapters))

    @property
    def load(self) -> int:
        """Requests this endpoint is working on, by the larger of our count and its own."""
        return max(self.in_flight, self.running + self.waiting)


RECENT_WINDOW = 256
"""Decay horizon of ``EndpointSnapshot.recent_routed``, in requests routed gateway-wide."""


def decayed_recent(value: float, *, last_seq: int, seq: int) -> float:
    """A recent-routing count ``value`` as of request ``last_seq``, decayed to request ``seq``
    (0 when ``last_seq`` < 0: nothing routed yet). The one definition of the decay, used by
    :class:`routing.state.EngineState` when it counts and by scorers when they read."""
    if last_seq < 0:
        return 0.0
    return value * (1.0 - 1.0 / RECENT_WINDOW) ** max(0, seq - last_seq)


def recent_routed_at(ep: EndpointSnapshot, seq: int) -> float:
    """``ep.recent_routed`` decayed to request ``seq`` (0 for an endpoint never routed to)."""
    return decayed_recent(ep.recent_routed, last_seq=ep.last_routed_seq, seq=seq)


def recent_placed_at(ep: EndpointSnapshot, seq: int) -> float:
    """``ep.recent_placed`` decayed to request ``seq`` (0 for an endpoint never routed to)."""
    return decayed_recent(ep.recent_placed, last_seq=ep.last_routed_seq, seq=seq)


def is_placement(req: RouteRequest, endpoint_ids: Iterable[str]) -> bool:
    """Whether routing ``req`` places a new sticky prefix: no candidate holds more of its
    prompt than another (cold everywhere, or only a prefix every candidate holds, such as a
    system prompt shared by all sessions). Wherever it lands, its followers (the group's
    next prompts, the session's next turns) will follow it there."""
    held = [req.prefix_blocks.get(eid, 0) for eid in endpoint_ids]
    return not held or max(held) == min(held)


@dataclass(frozen=True, slots=True)
class FairnessView:
    """One user's virtual token counter against the active users' range (VTC, Sheng et al. 2024).

    ``counter`` is the user's weighted service received (input + ``w_out`` x output tokens);
    ``low``/``high`` are the smallest and largest counters among users with requests in flight.
    Example: ``FairnessView(counter=5000, low=0, high=8000, active_users=3)``.
    """

    counter: float
    low: float
    high: float
    active_users: int = 1


class Filter(Protocol):
    """Drops endpoints that must not serve the request; may return an empty sequence."""

    @property
    def name(self) -> str: ...

    def filter(
        self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]
    ) -> Sequence[EndpointSnapshot]: ...


class Scorer(Protocol):
    """Scores each endpoint in [0, 1]; higher is better. One float per endpoint, in order."""

    @property
    def name(self) -> str: ...

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]: ...


class Picker(Protocol):
    """Ranks endpoints from their combined scores; returns a non-empty list."""

    @property
    def name(self) -> str: ...

    def pick(
        self,
        req: RouteRequest,
        endpoints: Sequence[EndpointSnapshot],
        scores: Sequence[float],
    ) -> list[EndpointSnapshot]: ...
