"""Policy registry: a plain dict of named policy builders, filled in :func:`builtin_policies`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from routing.filters import Healthy, ServesModel
from routing.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from routing.policy import Policy
from routing.scorers.least_request import LeastRequest

PolicyBuilder = Callable[[], Policy]

_BASE_FILTERS = (Healthy(), ServesModel())


def _random() -> Policy:
    return Policy(name="random", filters=_BASE_FILTERS, scorers=(), picker=RandomPicker())


def _round_robin() -> Policy:
    return Policy(name="round-robin", filters=_BASE_FILTERS, scorers=(), picker=RoundRobinPicker())


def _least_request() -> Policy:
    return Policy(
        name="least-request",
        filters=_BASE_FILTERS,
        scorers=((LeastRequest(), 1.0),),
        picker=MaxScorePicker(),
    )


def builtin_policies() -> dict[str, PolicyBuilder]:
    """Every built-in policy by name. Example: ``builtin_policies()["round-robin"]()``."""
    return {
        "random": _random,
        "round-robin": _round_robin,
        "least-request": _least_request,
    }


def build_policies(builders: Mapping[str, PolicyBuilder]) -> dict[str, Policy]:
    """Instantiate every policy once (policies are immutable and shared by all requests)."""
    return {name: build() for name, build in builders.items()}
