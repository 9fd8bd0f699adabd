"""LoRA adapter placement: which engines should hold which adapters (pure, no I/O, no clock).

Many adapters share few base-model engines. Each engine *holds* (keeps registered) at most
:attr:`EngineSlots.capacity` of them: vLLM's CPU LoRA cache, ``max_cpu_loras`` (configured:
vLLM does not export it; unknown = ``max_loras``, vLLM's default). ``max_loras`` (GPU slots,
scraped) only bounds how many distinct adapters run in one batch: vLLM swaps a held
adapter into a GPU slot in milliseconds when a batch needs it, while a load reads it from
disk (hundreds of ms). So residency counts CPU-cache slots, and routing prefers engines
where the adapter runs or a GPU slot is free (:func:`choose_for_load`, the
``lora-affinity`` scorer). The gateway's placement controller calls :func:`plan` every interval with
the adapters' demand and what every engine holds, and executes the returned actions; a
request for an adapter loaded nowhere asks :func:`choose_for_load` where to load it now.

Rules (``s`` = :class:`PlacementSettings`):

* **Desired replicas** (:func:`desired_replicas`): ``max(ceil(rate / s.rate_per_replica),
  ceil(queued_tokens / s.tokens_per_replica), 1)`` engines while the adapter has *recent
  demand* (requests waiting or queued, or a request within ``s.idle_s``), capped at
  ``s.max_replicas`` (and, by :func:`plan`, at the healthy engines of its base model); 0
  once idle past ``s.idle_s``.
* **Loads** go where a slot is free, only onto healthy engines of the adapter's base model,
  preferring engines with fewer adapters, then lower load, then the id (deterministic). An
  adapter's first replica is ``reason="demand"``, further ones (a hot adapter spread over
  several engines) ``"spread"``. Adapters with requests waiting for a load come first, then
  every other placement by *marginal value*, the requests/s the new replica would serve
  (``rate / (replicas + 1)``): a 4.4 req/s adapter's 2nd replica (2.2) comes before a
  0.09 req/s adapter's 1st, so hot adapters spread even when residency slots are scarce.
  Routing concentrates an adapter's traffic on
  the engines holding it (:class:`routing.scorers.lora.LoraAffinity`), so replicas are only
  added when demand outgrows them.
* **Making room**: with no free slot, a load may unload one *reclaimable* adapter on an
  engine of the same base model (the pair is emitted unload first, ``reason="make_room"``).
  Reclaimable = not being loaded, no request running or waiting on it there
  (``EngineSlots.active``), loaded at least ``s.min_residency_s`` ago, unused there for at
  least ``s.min_idle_s``, and either idle (desired 0), not in the demand at all (loaded by
  hand or unknown to the registry), or a *surplus* replica: its adapter holds more than
  ``desired + s.hysteresis`` replicas; or, failing those, *displaced*: a replica of a
  wanted adapter with no request waiting that serves less than ``1 / s.displace_ratio``
  of what the placement would serve per replica (the lowest first). Among the first kind
  the least recently used one goes (LRU over every candidate engine).
  So an adapter's replica count only shrinks below what it once needed
  after the band is crossed, and never because a neighbour wants a slot for a few seconds.
* **Minimum residency is absolute**: nothing loaded less than ``s.min_residency_s`` ago is
  unloaded, for any reason -- it may be the very load a waiting request triggered, and
  undoing it is the thrash this module exists to prevent. Lower the setting to trade. The
  one exception is a preload no request has asked for yet (below).
* **Preload** (``s.preload``, on by default): adapters never requested yet (no
  ``last_used``, nothing waiting) are loaded into slots still free after every other
  placement (``reason="preload"``, one replica, never making room), so a first request
  finds them held, as a fleet with every adapter pinned would. They are not idle-unloaded;
  being desired 0 they give their slot up to any placement or on-demand load that needs
  it, first of all (before the least recently used adapter) and with neither minimum
  residency nor ``min_idle_s`` protecting them while no request has asked for them
  (``EngineSlots.preloaded``): nothing relies on them yet, and a fleet whose free slots a
  preload just filled must not make an on-demand request wait ``min_residency_s``.
* **Idle unloads**: an adapter whose demand went idle (desired 0) is unloaded from every
  engine (``reason="idle"``, LRU first) once it is past minimum residency and not active.
  Adapters loaded by hand (present on engines, absent from the demand) are left alone
  unless their slot is needed; the controller that wants them managed puts them in the
  demand (``rate=0``, ``last_used`` from what it saw).
* **Refused loads back off**: ``EngineSlots.blocked`` names the adapters whose loads on
  that engine are backing off (the engine refused or failed the last one; the gateway
  waits :func:`load_backoff` before trying again). Such an engine is no candidate for the
  adapter at all: no load there, and no room made there for it (an unload for a load that
  will not happen only loses a loaded adapter). An adapter blocked on every healthy engine
  of its base model (:func:`blocked_everywhere`) is not placed until a backoff passes;
  :func:`suppressed` names those the demand still wants (the loads not made).
* **Bounded**: at most ``s.max_actions`` actions per plan, an unload and the load it makes
  room for are kept together. Unhealthy engines get no actions and their adapters count for
  nothing (the adapter is re-placed elsewhere; the engine is reconciled when it returns).

Actions are in execution order: an engine's ``make_room`` unload precedes the load that
needs its slot. Example::

    s = PlacementSettings()
    eng = EngineSlots("e1", "llama", max_loras=2, loaded={"sql": 0.0})
    plan([AdapterDemand("chat", "llama", rate=1.0, last_used=99.0)], [eng], now=100.0,
         settings=s)
    # -> (PlacementAction("load", "chat", "e1", "demand"),)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "AdapterDemand",
    "EngineSlots",
    "PlacementAction",
    "PlacementSettings",
    "blocked_everywhere",
    "choose_for_load",
    "desired_replicas",
    "load_backoff",
    "plan",
    "suppressed",
]

ActionKind = Literal["load", "unload"]


@dataclass(frozen=True, slots=True)
class AdapterDemand:
    """One adapter's demand, as the gateway sees it.

    Example: ``AdapterDemand("sql", "llama", rate=3.5, last_used=1234.0)``.
    """

    name: str
    """The adapter (the served model name of the LoRA)."""
    base_model: str
    rate: float
    """Request-rate EWMA, requests/s."""
    queued_tokens: int = 0
    """Prompt tokens waiting for this adapter (gateway view)."""
    last_used: float | None = None
    """Clock seconds of the last request (None: never)."""
    waiting: int = 0
    """Requests waiting for an on-demand load right now."""


@dataclass(frozen=True, slots=True)
class EngineSlots:
    """One engine's LoRA slots and what occupies them.

    Example: ``EngineSlots("e1", "llama", max_loras=4, loaded={"sql": 10.0})``.
    """

    engine_id: str
    base_model: str
    max_loras: int
    """GPU slots (``vllm:lora_requests_info`` ``max_lora``, else configured): how many
    distinct adapters run in one batch. Only the residency capacity when
    ``max_cpu_loras`` is unknown."""
    loaded: Mapping[str, float]
    """Adapter -> clock seconds when it was loaded (minimum residency)."""
    loading: frozenset[str] = frozenset()
    healthy: bool = True
    load: float = 0.0
    """In-flight requests (for spreading)."""
    last_used: Mapping[str, float] = field(default_factory=dict)
    """Adapter -> clock seconds of the last request routed here for it (LRU). Missing: the
    adapter's ``AdapterDemand.last_used`` (in :func:`plan`), else its load time."""
    active: frozenset[str] = frozenset()
    """Adapters with requests running or waiting here now (never unloaded)."""
    blocked: frozenset[str] = frozenset()
    """Adapters whose loads here are backing off after a refusal or failure: not loaded
    here, and no room made here for them (module docstring)."""
    preloaded: frozenset[str] = frozenset()
    """Loaded adapters the gateway preloaded here that no request has asked for since:
    unloaded first when room is needed, minimum residency and ``min_idle_s`` aside."""
    max_cpu_loras: int | None = None
    """Adapters the engine keeps registered (vLLM's CPU LoRA cache, ``--max-cpu-loras``;
    vLLM does not export it, so configured): the residency capacity. None: ``max_loras``
    (vLLM's default). Never below ``max_loras``."""

    @property
    def capacity(self) -> int:
        """Adapters this engine may hold loaded (``max(max_loras, max_cpu_loras)``)."""
        return max(self.max_loras, self.max_cpu_loras or 0)

    @property
    def used(self) -> int:
        """Slots taken by loaded and loading adapters."""
        return len(self.loaded.keys() | self.loading)

    @property
    def free(self) -> int:
        """Residency slots free (of :attr:`capacity`)."""
        return max(0, self.capacity - self.used)

    @property
    def gpu_free(self) -> bool:
        """Fewer adapters active here than GPU slots: a newly loaded one runs at once
        instead of waiting for a running adapter's batch to drain."""
        return len(self.active) < self.max_loras

    def holds(self, adapter: str) -> bool:
        """Loaded here or being loaded."""
        return adapter in self.loaded or adapter in self.loading

    def serves(self, base_model: str) -> bool:
        """Healthy, with slots, for ``base_model``: a candidate for that model's adapters."""
        return self.healthy and self.base_model == base_model and self.capacity > 0


@dataclass(frozen=True, slots=True)
class PlacementAction:
    """One load or unload for the actuator.

    ``reason`` is a bounded vocabulary (a metric label): ``demand``, ``spread``, ``idle``,
    ``make_room``, ``on_demand`` (and ``reconcile`` for the actuator's own corrections).
    Example: ``PlacementAction("load", "sql", "e1", "demand")``.
    """

    kind: ActionKind
    adapter: str
    engine_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    """Placement knobs; durations in clock seconds.

    Example: ``PlacementSettings(rate_per_replica=4.0, min_residency_s=60.0)``.
    """

    rate_per_replica: float = 2.0
    """Requests/s of one adapter one engine should take before another replica is wanted."""
    tokens_per_replica: int = 16384
    """Queued prompt tokens of one adapter per replica."""
    max_replicas: int | None = None
    """Cap on one adapter's replicas (None: every engine of its base model)."""
    hysteresis: int = 1
    """A replica is surplus (reclaimable for another adapter) only above desired + this."""
    min_residency_s: float = 30.0
    """Nothing loaded less than this long ago is unloaded (see the module docstring)."""
    min_idle_s: float = 5.0
    """An adapter used on an engine within this long is not unloaded from it to make room."""
    idle_s: float = 300.0
    """An adapter without a request for this long wants 0 replicas and is unloaded."""
    max_actions: int = 8
    """Actions per :func:`plan` call (the rest waits for the next one)."""
    load_backoff_s: float = 5.0
    """Wait after an engine's first refused or failed load of an adapter (:func:`load_backoff`)."""
    load_backoff_max_s: float = 300.0
    """Cap of that wait, which doubles with each further failure."""
    preload: bool = True
    """Load adapters never requested yet into free slots (``reason="preload"``, after every
    other placement, never making room); they are not idle-unloaded, only give their slot
    up when it is needed (module docstring). On by default, as vLLM's ``--lora-modules``
    and AIBrix's ModelAdapter load a declared adapter before its first request: a slot
    left empty saves nothing, and a first request that waits for a load is the tail."""
    displace_ratio: float = 2.0
    """A placement may unload (``make_room``) a settled replica of a wanted adapter when
    that replica serves less than 1/this of the requests/s the placement would serve
    (``inf``: only idle, unknown or surplus replicas make room)."""

    def __post_init__(self) -> None:
        if self.rate_per_replica <= 0 or self.tokens_per_replica <= 0:
            raise ValueError("rate_per_replica and tokens_per_replica must be > 0")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError("max_replicas must be >= 1")
        if self.hysteresis < 0 or self.max_actions < 1:
            raise ValueError("hysteresis must be >= 0 and max_actions >= 1")
        if min(self.min_residency_s, self.min_idle_s, self.idle_s) < 0:
            raise ValueError("durations must be >= 0")
        if not 0 < self.load_backoff_s <= self.load_backoff_max_s:
            raise ValueError("need 0 < load_backoff_s <= load_backoff_max_s")
        if not self.displace_ratio >= 1:
            raise ValueError("displace_ratio must be >= 1")


def load_backoff(failures: int, s: PlacementSettings) -> float:
    """Seconds before loading an adapter again on an engine that refused or failed its last
    ``failures`` loads in a row: ``s.load_backoff_s`` doubling per failure, capped at
    ``s.load_backoff_max_s``; 0 without failures. Example: 5, 10, 20, ... 300."""
    if failures <= 0:
        return 0.0
    return min(s.load_backoff_max_s, s.load_backoff_s * 2.0 ** min(failures - 1, 64))


def _recent(d: AdapterDemand, s: PlacementSettings, now: float | None) -> bool:
    if d.waiting > 0 or d.queued_tokens > 0:
        return True
    if d.last_used is None:
        return False
    return now is None or now - d.last_used < s.idle_s


def desired_replicas(d: AdapterDemand, s: PlacementSettings, *, now: float | None = None) -> int:
    """Engines ``d`` should be loaded on (module docstring). Without ``now`` any past request
    counts as recent (the caller judges idleness). Not capped by the engines available."""
    if not _recent(d, s, now):
        return 0
    by_rate = math.ceil(max(0.0, d.rate) / s.rate_per_replica)
    by_tokens = math.ceil(d.queued_tokens / s.tokens_per_replica)
    want = max(1, by_rate, by_tokens)
    return want if s.max_replicas is None else min(want, s.max_replicas)


@dataclass(slots=True)
class _Engine:
    """Mutable working copy of one engine during a plan."""

    slots: EngineSlots
    held: set[str]
    loaded: dict[str, float]

    @property
    def free(self) -> int:
        return self.slots.capacity - len(self.held)


def _last_use(e: EngineSlots, adapter: str, demand: AdapterDemand | None) -> float:
    used = e.last_used.get(adapter)
    if used is not None:
        return used
    if demand is not None and demand.last_used is not None:
        return demand.last_used
    return e.loaded.get(adapter, -math.inf)


def _settled(e: EngineSlots, adapter: str, now: float, s: PlacementSettings) -> bool:
    """May ``adapter`` be unloaded from ``e`` at all (residency, not loading, not active)?
    A preload nothing asked for yet has no residency to protect."""
    return (
        adapter in e.loaded
        and adapter not in e.loading
        and adapter not in e.active
        and (adapter in e.preloaded or now - e.loaded[adapter] >= s.min_residency_s)
    )


def _idle_enough(e: EngineSlots, adapter: str, d: AdapterDemand | None, now: float,
                 s: PlacementSettings) -> bool:  # fmt: skip
    """Unused on ``e`` for at least ``min_idle_s`` (a preload nothing asked for: always)."""
    return adapter in e.preloaded or now - _last_use(e, adapter, d) >= s.min_idle_s


def _load_order(e: _Engine) -> tuple[int, float, str]:
    return (len(e.held), e.slots.load, e.slots.engine_id)


class _Planner:
    """One :func:`plan` call's working state (replica counts change as actions are chosen)."""

    def __init__(
        self,
        demand: Sequence[AdapterDemand],
        engines: Sequence[EngineSlots],
        now: float,
        s: PlacementSettings,
    ) -> None:
        self.now = now
        self.s = s
        self.demand = {d.name: d for d in demand}
        self.engines = [
            _Engine(e, set(e.loaded) | set(e.loading), dict(e.loaded))
            for e in engines
            if e.healthy and e.capacity > 0
        ]
        self.desired = {d.name: desired_replicas(d, s, now=now) for d in demand}
        self.counts: dict[str, int] = {}
        for e in self.engines:
            for a in e.held:
                self.counts[a] = self.counts.get(a, 0) + 1
        self.actions: list[PlacementAction] = []

    def replicas(self, adapter: str) -> int:
        return self.counts.get(adapter, 0)

    def room(self, n: int) -> bool:
        return len(self.actions) + n <= self.s.max_actions

    def per_replica(self, adapter: str) -> float:
        """The requests/s each of ``adapter``'s replicas serves now (0: not in the demand)."""
        d = self.demand.get(adapter)
        return 0.0 if d is None else max(0.0, d.rate) / max(1, self.replicas(adapter))

    def reclaimable(self, e: _Engine, adapter: str, value: float) -> int | None:
        """None when ``adapter`` may not leave ``e`` for a placement worth ``value``; else
        0 (idle, unknown or surplus) or 1 (displaced: it serves less than a
        ``s.displace_ratio``-th of ``value`` per replica)."""
        if adapter not in e.loaded or not _settled(e.slots, adapter, self.now, self.s):
            return None
        d = self.demand.get(adapter)
        if not _idle_enough(e.slots, adapter, d, self.now, self.s):
            return None
        desired = self.desired.get(adapter, 0)
        if d is None or desired == 0 or self.replicas(adapter) > desired + self.s.hysteresis:
            return 0
        if d.waiting == 0 and self.per_replica(adapter) * self.s.displace_ratio < value:
            return 1
        return None

    def place(self, d: AdapterDemand, reason: str, value: float) -> bool:
        """Load ``d`` on one more engine (making room if needed); False when nowhere."""
        candidates = [
            e
            for e in self.engines
            if e.slots.base_model == d.base_model
            and d.name not in e.held
            and d.name not in e.slots.blocked
        ]
        free = [e for e in candidates if e.free > 0]
        if free:  # the caller checked room for one action
            target = min(free, key=_load_order)
        else:
            victims = []
            for e in candidates:
                for a in e.loaded:
                    cls = self.reclaimable(e, a, value)
                    if cls is not None:
                        rank = self.per_replica(a) if cls else 0.0
                        last = _last_use(e.slots, a, self.demand.get(a))
                        fresh = a not in e.slots.preloaded  # unasked preloads go first
                        victims.append((cls, fresh, rank, last, e.slots.load, e.slots.engine_id, a))
            if not victims or not self.room(2):
                return False
            *_, engine_id, victim = min(victims)
            target = next(e for e in candidates if e.slots.engine_id == engine_id)
            self.unload(target, victim, "make_room")
        target.held.add(d.name)
        self.counts[d.name] = self.replicas(d.name) + 1
        self.actions.append(PlacementAction("load", d.name, target.slots.engine_id, reason))
        return True

    def unload(self, e: _Engine, adapter: str, reason: str) -> None:
        e.held.discard(adapter)
        del e.loaded[adapter]
        self.counts[adapter] = self.replicas(adapter) - 1
        self.actions.append(PlacementAction("unload", adapter, e.slots.engine_id, reason))

    def loads(self) -> None:
        """Placements by marginal value: the requests/s the next replica would serve
        (``rate / (replicas + 1)``), so a hot adapter's 2nd replica (4.4 req/s -> 2.2)
        comes before a cold adapter's 1st (0.09); a first replica with requests waiting
        for it comes before everything. An adapter that cannot be placed is not tried
        again in this plan."""
        engines: dict[str, int] = {}
        for e in self.engines:
            engines[e.slots.base_model] = engines.get(e.slots.base_model, 0) + 1
        want = {
            d.name: min(self.desired[d.name], engines.get(d.base_model, 0))
            for d in self.demand.values()
        }
        heap: list[tuple[bool, float, int, str]] = []
        for d in self.demand.values():
            self._push(heap, d, want[d.name])
        while heap and self.room(1):
            _, neg_value, _, name = heapq.heappop(heap)
            d = self.demand[name]
            reason = "demand" if self.replicas(name) == 0 else "spread"
            if self.place(d, reason, -neg_value):
                self._push(heap, d, want[name])
        if self.s.preload:
            self.preloads()

    def preloads(self) -> None:
        for d in sorted(self.demand.values(), key=lambda d: d.name):
            if not self.room(1):
                return
            if self.desired[d.name] > 0 or d.last_used is not None or self.replicas(d.name):
                continue
            free = [
                e
                for e in self.engines
                if e.slots.base_model == d.base_model
                and e.free > 0
                and d.name not in e.slots.blocked
            ]
            if free:
                target = min(free, key=_load_order)
                target.held.add(d.name)
                self.counts[d.name] = 1
                self.actions.append(PlacementAction("load", d.name, target.slots.engine_id,
                                                    "preload"))  # fmt: skip

    def _push(self, heap: list[tuple[bool, float, int, str]], d: AdapterDemand, want: int) -> None:
        r = self.replicas(d.name)
        if r >= want:
            return
        value = math.inf if r == 0 and d.waiting > 0 else max(0.0, d.rate) / (r + 1)
        heapq.heappush(heap, (value != math.inf, -value, r, d.name))

    def idle_unloads(self) -> None:
        idle = [
            (_last_use(e.slots, a, self.demand[a]), e.slots.engine_id, a, e)
            for e in self.engines
            for a in e.loaded
            if a in self.demand
            and self.desired[a] == 0
            and not (self.s.preload and self.demand[a].last_used is None)
            and _settled(e.slots, a, self.now, self.s)
        ]
        for _, _, adapter, e in sorted(idle, key=lambda t: t[:3]):
            if not self.room(1):
                return
            self.unload(e, adapter, "idle")


def plan(
    demand: Sequence[AdapterDemand],
    engines: Sequence[EngineSlots],
    *,
    now: float,
    settings: PlacementSettings,
) -> tuple[PlacementAction, ...]:
    """The next bounded batch of loads and unloads (module docstring), in execution order."""
    planner = _Planner(demand, engines, now, settings)
    planner.loads()
    planner.idle_unloads()
    return tuple(planner.actions)


def choose_for_load(
    adapter: str,
    base_model: str,
    engines: Sequence[EngineSlots],
    *,
    now: float,
    settings: PlacementSettings,
) -> tuple[PlacementAction, ...] | None:
    """Where to load ``adapter`` now for a request waiting for it (on-demand load).

    Returns ``()`` when a healthy engine of ``base_model`` already holds it or is loading it
    (wait for that one: coalescing); engines in ``blocked`` for it are skipped (no load, no
    room made); ``(load,)`` onto an engine with a free slot: one with a free GPU slot
    (:attr:`EngineSlots.gpu_free`) first, then the fewest loads in flight (vLLM runs one
    engine's loads one after another, between its steps: concurrent first requests for
    different adapters load on different engines, not all on the least loaded one), then
    the least loaded (fewer adapters breaks ties);
    ``(unload, load)`` on one engine when only making room
    works: a preload no request asked for (:attr:`EngineSlots.preloaded`), else the least
    recently used reclaimable adapter there (not active, not loading, past
    ``min_residency_s``, unused for ``min_idle_s``; ``EngineSlots.last_used``, else its load
    time); ``None`` when no engine can take it now (the gateway answers 503 + retry-after).
    """
    eligible = [e for e in engines if e.serves(base_model)]
    if any(e.holds(adapter) for e in eligible):
        return ()
    eligible = [e for e in eligible if adapter not in e.blocked]
    free = [e for e in eligible if e.free > 0]
    if free:
        target = min(
            free, key=lambda e: (not e.gpu_free, len(e.loading), e.load, e.used, e.engine_id)
        )
        return (PlacementAction("load", adapter, target.engine_id, "on_demand"),)
    victims = [
        (a not in e.preloaded, _last_use(e, a, None), e.load, e.engine_id, a)
        for e in eligible
        for a in _reclaimable_now(e, now, settings)
    ]
    if not victims:
        return None
    *_, engine_id, victim = min(victims)
    return (
        PlacementAction("unload", victim, engine_id, "make_room"),
        PlacementAction("load", adapter, engine_id, "on_demand"),
    )


def _reclaimable_now(e: EngineSlots, now: float, s: PlacementSettings) -> Iterable[str]:
    for a in e.loaded:
        if _settled(e, a, now, s) and _idle_enough(e, a, None, now, s):
            yield a


def blocked_everywhere(adapter: str, base_model: str, engines: Sequence[EngineSlots]) -> bool:
    """True when no healthy engine of ``base_model`` holds ``adapter``, at least one could,
    and every one of them has its loads of ``adapter`` backing off (``EngineSlots.blocked``):
    nothing may load it now, and a request for it gets the remembered refusal."""
    eligible = [e for e in engines if e.serves(base_model)]
    return bool(eligible) and all(adapter in e.blocked and not e.holds(adapter) for e in eligible)


def suppressed(
    demand: Sequence[AdapterDemand],
    engines: Sequence[EngineSlots],
    *,
    now: float,
    settings: PlacementSettings,
) -> tuple[str, ...]:
    """Adapters the demand wants loaded (desired > 0) that :func:`plan` leaves unplaced
    because they are :func:`blocked_everywhere` (the loads the backoff suppressed), sorted."""
    return tuple(
        sorted(
            d.name
            for d in demand
            if desired_replicas(d, settings, now=now) > 0
            and blocked_everywhere(d.name, d.base_model, engines)
        )
    )
