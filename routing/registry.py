"""Policy registry: named built-in policies, plugin types, and profiles built from config.

* :func:`builtin_policies` -- name -> builder of every built-in policy;
* :func:`builtin_plugins` -- plugin ``type`` -> constructor, per kind (filter/scorer/picker);
* :func:`build_profile` -- a policy from a config dict (discriminated on ``type``)::

      {"filters": ["healthy", "serves-model", {"type": "saturation", "max_waiting": 8}],
       "scorers": [{"type": "prefix-cache", "weight": 3},
                   {"type": "least-kv-cache", "weight": 1}],
       "picker": "max-score"}

  A plugin is either its type name or a dict with ``type`` plus keyword params (and
  ``weight`` for scorers, default 1). Unknown types or params raise :class:`ProfileError`
  naming the offending entry, so a bad config fails at startup, not on the first request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from routing.filters import Healthy, NotSaturated, NotSlow, ServesAdapter, ServesModel
from routing.pickers import MaxScorePicker, PowerOfTwoPicker, RandomPicker, RoundRobinPicker
from routing.policy import Policy
from routing.scorers.fairness import Fairness
from routing.scorers.kv_cache import LeastKvCache
from routing.scorers.latency import LeastLatency
from routing.scorers.least_request import LeastRequest
from routing.scorers.lora import LoraAffinity
from routing.scorers.prefix_cache import PrefixCacheCost
from routing.scorers.session_affinity import SessionAffinity
from routing.scorers.token_load import TokenLoad
from routing.types import Filter, Picker, Scorer

__all__ = [
    "PolicyBuilder",
    "ProfileError",
    "builtin_plugins",
    "builtin_policies",
    "build_policies",
    "build_profile",
]

PolicyBuilder = Callable[[], Policy]

_BASE_FILTERS = (Healthy(), ServesModel(), NotSlow())


class ProfileError(ValueError):
    """A routing profile in the config is invalid; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Plugins:
    """Constructors by ``type`` name for each plugin kind."""

    filters: Mapping[str, Callable[..., Filter]]
    scorers: Mapping[str, Callable[..., Scorer]]
    pickers: Mapping[str, Callable[..., Picker]]


def builtin_plugins() -> Plugins:
    """Every built-in filter, scorer and picker by ``type`` name."""
    return Plugins(
        filters={
            "healthy": Healthy,
            "serves-model": ServesModel,
            "saturation": NotSaturated,
            "not-slow": NotSlow,
            "serves-adapter": ServesAdapter,
        },
        scorers={
            "least-request": LeastRequest,
            "least-kv-cache": LeastKvCache,
            "least-latency": LeastLatency,
            "token-load": TokenLoad,
            "session-affinity": SessionAffinity,
            "prefix-cache": PrefixCacheCost,
            "fairness": Fairness,
            "lora-affinity": LoraAffinity,
        },
        pickers={
            "max-score": MaxScorePicker,
            "random": RandomPicker,
            "round-robin": RoundRobinPicker,
            "power-of-two": PowerOfTwoPicker,
        },
    )


_LORA_WEIGHT = 1.0
"""Weight of :class:`LoraAffinity` in every built-in policy that scores. ``serves-model``
already narrows an adapter request to the engines listing it, so among those the scorer
prefers one where the adapter is active (warm GPU slot) over one where it sits idle by
0.1 x this weight -- outweighed by a load difference of a tenth of the busiest engine's.
Base-model requests skip it (``adapter_only``). Profiles may add the ``serves-adapter``
filter (loading and free-slot engines too) and weigh the scorer as they like."""


def _policy(name: str, scorers: tuple[tuple[Scorer, float], ...], picker: Picker) -> Policy:
    if scorers:  # random and round-robin pickers read no scores
        scorers = (*scorers, (LoraAffinity(), _LORA_WEIGHT))
    return Policy(name=name, filters=_BASE_FILTERS, scorers=scorers, picker=picker)


def builtin_policies() -> dict[str, PolicyBuilder]:
    """Every built-in policy by name. Example: ``builtin_policies()["round-robin"]()``."""
    return {
        "random": lambda: _policy("random", (), RandomPicker()),
        "round-robin": lambda: _policy("round-robin", (), RoundRobinPicker()),
        "least-request": lambda: _policy(
            "least-request", ((LeastRequest(), 1.0),), MaxScorePicker()
        ),
        # KV usage is scraped (stale): gateway in-flight counts spread bursts between scrapes.
        "least-kv-cache": lambda: _policy(
            "least-kv-cache", ((LeastKvCache(), 1.0), (LeastRequest(), 0.25)), MaxScorePicker()
        ),
        "least-latency": lambda: _policy(
            "least-latency", ((LeastLatency(), 1.0), (LeastRequest(), 0.25)), MaxScorePicker()
        ),
        "throughput": lambda: _policy("throughput", ((TokenLoad(), 1.0),), MaxScorePicker()),
        "power-of-two": lambda: _policy(
            "power-of-two", ((LeastRequest(), 1.0),), PowerOfTwoPicker()
        ),
        # Affinity decides; least-request only breaks ties (requests without a key).
        "session-affinity": lambda: _policy(
            "session-affinity",
            ((SessionAffinity(), 1.0), (LeastRequest(), 0.01)),
            MaxScorePicker(),
        ),
        "prefix-cache": lambda: _policy(
            "prefix-cache", ((PrefixCacheCost(), 1.0),), MaxScorePicker()
        ),
        "fairness": lambda: _policy("fairness", ((Fairness(), 1.0),), MaxScorePicker()),
    }


def build_policies(builders: Mapping[str, PolicyBuilder]) -> dict[str, Policy]:
    """Instantiate every policy once (policies are immutable and shared by all requests)."""
    return {name: build() for name, build in builders.items()}


def _split_spec(where: str, spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("type"), str):
        params = dict(spec)
        return params.pop("type"), params
    raise ProfileError(f"{where}: expected a type name or a mapping with 'type', got {spec!r}")


def _make(where: str, table: Mapping[str, Callable[..., Any]], spec: Any) -> tuple[Any, float]:
    kind, params = _split_spec(where, spec)
    weight = params.pop("weight", 1.0)
    if kind not in table:
        raise ProfileError(f"{where}: unknown type {kind!r} (known: {', '.join(sorted(table))})")
    if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
        raise ProfileError(f"{where}: weight must be a number >= 0, got {weight!r}")
    if "name" in params:
        raise ProfileError(f"{where}: 'name' is not a parameter")
    try:
        return table[kind](**params), float(weight)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{where} ({kind}): {exc}") from exc


def build_profile(name: str, spec: Mapping[str, Any], *, plugins: Plugins | None = None) -> Policy:
    """Build a named policy from a profile dict (see module docstring)."""
    table = plugins or builtin_plugins()
    unknown = set(spec) - {"filters", "scorers", "picker"}
    if unknown:
        raise ProfileError(f"profile {name!r}: unknown keys {sorted(unknown)}")
    filter_specs = spec.get("filters", ["healthy", "serves-model"])
    scorer_specs = spec.get("scorers", [])
    if not isinstance(filter_specs, list) or not isinstance(scorer_specs, list):
        raise ProfileError(f"profile {name!r}: 'filters' and 'scorers' must be lists")
    filters = tuple(
        _make(f"profile {name!r} filter #{i}", table.filters, s)[0]
        for i, s in enumerate(filter_specs)
    )
    scorers = tuple(
        _make(f"profile {name!r} scorer #{i}", table.scorers, s) for i, s in enumerate(scorer_specs)
    )
    picker, _ = _make(f"profile {name!r} picker", table.pickers, spec.get("picker", "max-score"))
    return Policy(name=name, filters=filters, scorers=scorers, picker=picker)
