"""A policy = filters, then weighted scorers, then a picker; :meth:`Policy.choose` ranks endpoints.

Example::

    policy = Policy(name="least-request", filters=(ServesModel(),),
                    scorers=((LeastRequest(), 1.0),), picker=MaxScorePicker())
    decision = policy.choose(req, endpoints)
    decision.ranked[0]  # the endpoint to try first; the proxy fails over down the list
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from routing.types import EndpointSnapshot, Filter, Picker, RouteRequest, Scorer


class NoEndpointError(LookupError):
    """No endpoint survived the filters; ``reason`` names the filter that emptied the set."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Decision:
    """The ranked endpoints plus enough detail to explain the choice."""

    ranked: tuple[EndpointSnapshot, ...]
    policy: str
    scores: tuple[tuple[str, float], ...] = ()
    details: tuple[str, ...] = ()
    """Per-scorer breakdowns (``scorer:...``), filled only by ``choose(..., explain=True)``."""

    def explain(self) -> str:
        """A short header-safe explanation: ``policy;e1=0.912,e2=0.400``."""
        parts = ",".join(f"{eid}={score:.3f}" for eid, score in self.scores)
        return f"{self.policy};{parts}" if parts else self.policy


@dataclass(frozen=True, slots=True)
class Policy:
    """Composition of small pure plugins; see module docstring."""

    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[tuple[Scorer, float], ...]
    picker: Picker
    reads_prefix: bool = field(init=False, default=False)
    """Whether a plugin reads the prompt's block hashes or prefix matches: if none does, the
    gateway skips hashing the prompt and the index lookup (round-robin pays nothing)."""
    base_scorers: tuple[tuple[Scorer, float], ...] = field(init=False, default=())
    """The scorers for requests naming no LoRA adapter: those without ``adapter_only``
    (:class:`routing.scorers.lora.LoraAffinity`), so base-model requests score as if the
    adapter scorers were not configured."""

    def __post_init__(self) -> None:
        plugins = (*self.filters, *(scorer for scorer, _ in self.scorers), self.picker)
        reads = any(getattr(plugin, "reads_prefix", False) for plugin in plugins)
        object.__setattr__(self, "reads_prefix", reads)
        base = tuple(sw for sw in self.scorers if not getattr(sw[0], "adapter_only", False))
        object.__setattr__(self, "base_scorers", base)

    def choose(
        self,
        req: RouteRequest,
        endpoints: Sequence[EndpointSnapshot],
        *,
        explain: bool = False,
    ) -> Decision:
        """Rank ``endpoints``; with ``explain`` also collect scorers' breakdowns (slower)."""
        candidates: Sequence[EndpointSnapshot] = endpoints
        details: list[str] = []
        for flt in self.filters:
            before = len(candidates)
            candidates = flt.filter(req, candidates)
            if not candidates:
                raise NoEndpointError(flt.name)
            if explain and len(candidates) != before:
                details.append(f"{flt.name}:kept={len(candidates)}/{before}")
        total = [0.0] * len(candidates)
        scorers = self.scorers if req.adapter is not None else self.base_scorers
        weight_sum = sum(w for _, w in scorers) or 1.0
        for scorer, weight in scorers:
            for i, value in enumerate(scorer.score(req, candidates)):
                total[i] += weight * min(1.0, max(0.0, value))
            describe = getattr(scorer, "explain", None) if explain else None
            if describe is not None:
                details.append(f"{scorer.name}:" + ";".join(describe(req, candidates)))
        combined = [t / weight_sum for t in total]
        ranked = self.picker.pick(req, candidates, combined)
        by_id = {ep.id: s for ep, s in zip(candidates, combined, strict=True)}
        return Decision(
            ranked=tuple(ranked),
            policy=self.name,
            scores=tuple((ep.id, by_id[ep.id]) for ep in ranked),
            details=tuple(details),
        )
