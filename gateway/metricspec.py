"""What a metric is, declared next to the code that exports it (a leaf module).

Each module that exports ``switchyard_*`` series declares a ``METRICS`` tuple of
:class:`MetricSpec`: the exposed name, type, unit and every label with its bounded value set
(or, when configuration or the fleet bounds it, what does). :mod:`gateway.metrics_catalog`
joins these with what the app's registry actually collects (names, types, help texts) into
``docs/metrics.md``; ``tests/observability/test_metric_catalog.py`` fails when they diverge and
enforces :func:`naming_problems` on everything exported.

Example::

    MetricSpec("switchyard_redis_errors_total", "counter", "errors",
               (Label("op", values=("ping", "ratelimit")),), when="redis_url")
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FORBIDDEN_LABELS",
    "SUBSYSTEMS",
    "UNITS",
    "Label",
    "MetricSpec",
    "MetricType",
    "naming_problems",
]

MetricType = Literal["counter", "gauge", "histogram"]

SUBSYSTEMS = (
    "admission", "auth", "autoscaler", "discovery", "endpoint", "kv_events", "kv_tier", "lora",
    "outlier", "prefix_index", "proxy", "ratelimit", "redis", "routing", "scrape",
    "shared_state",
)  # fmt: skip
"""The ``<subsystem>`` of ``switchyard_<subsystem>_<name>_<unit>`` (one per module family)."""

UNITS = (
    # base units (Prometheus naming: seconds, bytes, ratios 0..1; 0/1 states are ratios too:
    # their average over series is the share in that state)
    "seconds", "bytes", "ratio", "per_second",
    # counted things
    "requests", "tokens", "blocks", "pairs", "entries", "endpoints", "replicas", "keys",
    "rules", "items", "records", "patches", "batches", "settlements", "adapters",
    # counted events
    "decisions", "errors", "failures", "problems", "retries", "ejections", "evictions",
    "events", "relists", "reloads", "transitions", "operations",
)  # fmt: skip
"""The last word of a name (before ``_total``): what one unit of the value is. A counted
thing may be the whole name (``switchyard_redis_errors_total``, as ``http_requests_total``)."""

FORBIDDEN_LABELS = frozenset(
    {"request_id", "id", "user", "user_id", "key", "api_key", "key_id", "token", "prompt", "url"}
)
"""Labels that would be unbounded or secret: request ids, raw users, keys, URLs."""

_NAME = re.compile(r"switchyard_[a-z][a-z0-9_]*[a-z0-9]")


@dataclass(frozen=True, slots=True)
class Label:
    """One label: ``values`` is its whole value set when the code fixes it; otherwise
    ``bound`` says what bounds it (configuration, the engines of the fleet)."""

    name: str
    values: tuple[str, ...] = ()
    bound: str = ""

    def describe(self) -> str:
        if self.values:
            return ", ".join(f"`{v}`" for v in self.values)
        return self.bound


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exported family. ``name`` as exposed (counters end in ``_total``); ``when``: the
    setting that turns it on (empty: always exported)."""

    name: str
    type: MetricType
    unit: str
    labels: tuple[Label, ...] = ()
    when: str = ""

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    @property
    def subsystem(self) -> str:
        rest = self.name.removeprefix("switchyard_")
        for sub in sorted(SUBSYSTEMS, key=len, reverse=True):
            if rest.startswith(sub + "_"):
                return sub
        return ""


def naming_problems(spec: MetricSpec) -> list[str]:
    """Why ``spec`` breaks ``switchyard_<subsystem>_<name>_<unit>`` and the label rules
    (empty when it follows them)."""
    problems: list[str] = []
    name = spec.name
    if _NAME.fullmatch(name) is None:
        problems.append("not switchyard_ + lower snake case")
    if not spec.subsystem:
        problems.append(f"subsystem not one of {', '.join(SUBSYSTEMS)}")
    counter = spec.type == "counter"
    if counter != name.endswith("_total"):
        problems.append("_total is for counters, and every counter ends in it")
    if spec.type == "histogram" and not name.endswith("_seconds"):
        problems.append("histograms are in seconds")
    base = name.removesuffix("_total")
    if not any(base.endswith("_" + unit) for unit in UNITS):
        problems.append(f"no unit suffix (one of {', '.join(UNITS)})")
    elif not base.endswith("_" + spec.unit):
        problems.append(f"declared unit {spec.unit!r} is not the name's suffix")
    for label in spec.labels:
        if label.name in FORBIDDEN_LABELS:
            problems.append(f"label {label.name!r} is unbounded or secret")
        if not (label.values or label.bound):
            problems.append(f"label {label.name!r} has neither a value set nor a bound")
        if label.name == "le" or label.name.startswith("__"):
            problems.append(f"label {label.name!r} is reserved")
    return problems
