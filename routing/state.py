"""Per-engine state accumulator: gateway counters + EWMAs + the last scrape -> snapshots.

The gateway owns one :class:`EngineState` per endpoint and feeds it from the request path
(``begin`` / ``first_token`` / ``tokens`` / ``finish``) and from the metrics scraper
(``observe_metrics``); policies only ever see the immutable :class:`EndpointSnapshot` it
produces. Nothing here performs I/O or reads a clock: timestamps and durations are passed in.

Gateway counters matter because scraped gauges are up to a scrape interval stale: a burst of
requests routed within one interval would otherwise all see the same "idle" engine (AIBrix
#646). ``begin`` counts a request immediately; every way a request ends (``[DONE]``, stream
end, upstream error, client disconnect) calls ``finish`` on the same :class:`Ticket`, which is
idempotent, so counters never drift and need no periodic reset. With replicas sharing
routing state, ``set_remote`` adds the other gateways' counts on this engine to the snapshot
(replaced wholesale by each sync, so they cannot drift either).

Example::

    state = EngineState("e1", "http://127.0.0.1:8001")
    ticket = state.begin(prompt_tokens=900, max_tokens=128, cached_tokens=640)
    state.first_token(ticket, ttft_s=0.08)
    state.tokens(ticket, n=1, itl_s=0.02)
    state.finish(ticket)
    snap = state.snapshot()
"""

from __future__ import annotations

from dataclasses import dataclass

from routing.metrics_parser import EngineMetrics
from routing.types import EndpointSnapshot, decayed_recent

__all__ = ["EngineState", "Ticket"]

DEFAULT_OUTPUT_TOKENS = 256
"""Expected output length when a request sets no ``max_tokens`` (for token-load counting)."""


@dataclass(slots=True)
class Ticket:
    """One routed request's contribution to its engine's counters (released exactly once)."""

    prompt_tokens: int
    uncached_tokens: int
    expected_tokens: int
    started: bool = False
    done: bool = False
    output_tokens: int = 0


class EngineState:
    """Mutable, single-owner accumulator for one engine. Not thread-safe (one event loop).

    ``alpha`` is the EWMA weight of a new TTFT/ITL observation.
    """

    __slots__ = (
        "_adapters",
        "_alpha",
        "_cached",
        "_healthy",
        "_in_flight",
        "_in_flight_tokens",
        "_itl",
        "_last_seq",
        "_loading",
        "_max_loras",
        "_metrics",
        "_models",
        "_placed",
        "_prefill_tokens",
        "_recent",
        "_remote",
        "_scraped_at",
        "_slow",
        "_ttft",
        "_ttft_samples",
        "completed",
        "endpoint_id",
        "output_tokens_total",
        "prompt_tokens_total",
        "url",
    )

    def __init__(self, endpoint_id: str, url: str, *, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.endpoint_id = endpoint_id
        self.url = url
        self._alpha = alpha
        self._in_flight = 0
        self._in_flight_tokens = 0
        self._prefill_tokens = 0
        self._last_seq = -1
        self._recent = 0.0
        self._placed = 0.0
        self._ttft: float | None = None
        self._ttft_samples = 0
        self._slow = False
        self._itl: float | None = None
        self._metrics = EngineMetrics()
        self._scraped_at: float | None = None
        self._healthy = True
        self._models: frozenset[str] = frozenset()
        self._adapters: frozenset[str] = frozenset()
        self._loading: frozenset[str] = frozenset()
        self._max_loras: int | None = None
        self._cached: EndpointSnapshot | None = None
        # Other gateway replicas' (in_flight, in_flight_tokens, prefill_tokens) here, replaced
        # wholesale by the shared routing state's sync (gateway/sharedstate.py).
        self._remote: tuple[int, int, int] = (0, 0, 0)
        self.completed = 0
        self.prompt_tokens_total = 0
        self.output_tokens_total = 0

    # -- request path -------------------------------------------------------------------
    def begin(
        self,
        *,
        prompt_tokens: int,
        max_tokens: int | None = None,
        cached_tokens: int = 0,
        seq: int | None = None,
        placed: bool = False,
    ) -> Ticket:
        """Count a request routed here; ``cached_tokens`` is the expected prefix-cache hit,
        ``seq`` its ``RouteRequest.seq`` (least-recently-routed tie-breaks and the decayed
        recent-traffic counts; an older ``seq``, a late failover attempt, changes neither),
        ``placed`` whether it was a placement (:func:`routing.types.is_placement`)."""
        expected = max_tokens if max_tokens is not None else DEFAULT_OUTPUT_TOKENS
        uncached = max(0, prompt_tokens - max(0, cached_tokens))
        ticket = Ticket(
            prompt_tokens=prompt_tokens, uncached_tokens=uncached, expected_tokens=expected
        )
        self._in_flight += 1
        self._in_flight_tokens += prompt_tokens + expected
        self._prefill_tokens += uncached
        if seq is not None and seq >= self._last_seq:
            keep = decayed_recent(1.0, last_seq=self._last_seq, seq=seq)
            self._recent = self._recent * keep + 1.0
            self._placed = self._placed * keep + float(placed)
            self._last_seq = seq
        self.prompt_tokens_total += prompt_tokens
        self._cached = None
        return ticket

    def first_token(self, ticket: Ticket, *, ttft_s: float) -> None:
        """The first output token arrived after ``ttft_s``; its prefill is no longer queued."""
        if ticket.started or ticket.done:
            return
        ticket.started = True
        self._prefill_tokens -= ticket.uncached_tokens
        self._ttft = self._ewma(self._ttft, ttft_s)
        self._ttft_samples += 1
        self._cached = None

    def tokens(self, ticket: Ticket, *, n: int = 1, itl_s: float | None = None) -> None:
        """``n`` more output tokens arrived; ``itl_s`` is the gap since the previous chunk."""
        if ticket.done:
            return
        ticket.output_tokens += n
        self.output_tokens_total += n
        if itl_s is not None and n > 0:
            self._itl = self._ewma(self._itl, itl_s / n)
            self._cached = None

    def finish(self, ticket: Ticket) -> None:
        """Release the request's counters; safe to call more than once (first call wins)."""
        if ticket.done:
            return
        if not ticket.started:
            self._prefill_tokens -= ticket.uncached_tokens
        ticket.done = True
        self._in_flight -= 1
        self._in_flight_tokens -= ticket.prompt_tokens + ticket.expected_tokens
        self.completed += 1
        self._cached = None

    # -- other replicas -----------------------------------------------------------------
    def local_load(self) -> tuple[int, int, int]:
        """This process's own ``(in_flight, in_flight_tokens, prefill_tokens)`` here (what a
        replica publishes to the others; the snapshot adds theirs)."""
        return self._in_flight, self._in_flight_tokens, self._prefill_tokens

    def set_remote(
        self, *, in_flight: int = 0, in_flight_tokens: int = 0, prefill_tokens: int = 0
    ) -> None:
        """Replace the other replicas' counts on this engine (all 0: none, or unknown)."""
        remote = (in_flight, in_flight_tokens, prefill_tokens)
        if remote != self._remote:
            self._remote = remote
            self._cached = None

    @property
    def remote_load(self) -> tuple[int, int, int]:
        return self._remote

    # -- scraper / health ---------------------------------------------------------------
    def observe_metrics(self, metrics: EngineMetrics, *, at: float) -> None:
        """Store the last scrape (``at`` is the scraper's clock reading)."""
        self._metrics = metrics
        self._scraped_at = at
        self._cached = None

    def set_health(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self._cached = None

    def set_slow(self, slow: bool) -> None:
        """The gateway's slowness verdict (``EndpointSnapshot.slow``)."""
        if slow != self._slow:
            self._slow = slow
            self._cached = None

    @property
    def ttft(self) -> tuple[float | None, int]:
        """The TTFT EWMA and how many first tokens it has seen."""
        return self._ttft, self._ttft_samples

    def set_models(self, models: frozenset[str], *, adapters: frozenset[str] | None = None) -> None:
        """The engine's ``/v1/models`` ids; ``adapters`` the LoRA ones among them (entries
        with a ``parent``; ``None`` keeps the previous set, less ids no longer served)."""
        adapters = self._adapters & models if adapters is None else adapters
        if models != self._models or adapters != self._adapters:
            self._models = models
            self._adapters = adapters
            self._cached = None

    def set_lora_slots(self, max_loras: int | None, loading: frozenset[str]) -> None:
        """The configured LoRA slots (used while the engine exports no ``max_lora``) and the
        adapters the gateway is loading here now (``EndpointSnapshot.loading_adapters``)."""
        if max_loras != self._max_loras or loading != self._loading:
            self._max_loras = max_loras
            self._loading = loading
            self._cached = None

    @property
    def metrics(self) -> EngineMetrics:
        return self._metrics

    def snapshot(self) -> EndpointSnapshot:
        """An immutable view for policies; cached until the next mutation."""
        if self._cached is None:
            m = self._metrics
            r_in_flight, r_tokens, r_prefill = self._remote
            self._cached = EndpointSnapshot(
                id=self.endpoint_id,
                url=self.url,
                models=self._models,
                healthy=self._healthy,
                in_flight=self._in_flight + r_in_flight,
                in_flight_tokens=self._in_flight_tokens + r_tokens,
                running=m.running,
                waiting=m.waiting,
                kv_usage=m.kv_usage,
                ttft_ewma_s=self._ttft,
                itl_ewma_s=self._itl,
                scraped_at=self._scraped_at,
                prefill_tokens=self._prefill_tokens + r_prefill,
                block_size=m.block_size,
                running_adapters=m.running_adapters | m.waiting_adapters,
                adapters=self._adapters,
                loading_adapters=self._loading,
                max_loras=m.max_lora if m.max_lora is not None else self._max_loras,
                recent_routed=self._recent,
                recent_placed=self._placed,
                last_routed_seq=self._last_seq,
                slow=self._slow,
            )
        return self._cached

    def _ewma(self, old: float | None, value: float) -> float:
        return value if old is None else old + self._alpha * (value - old)
