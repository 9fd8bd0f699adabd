"""The public names of the autoscaler's I/O modules, pinned (house style: ``__all__`` checked)."""

from __future__ import annotations

import importlib

import pytest

EXPORTS = {
    "autoscale.actuator": {"LIMITS", "Actuator", "ActuatorState", "Limits", "Plan", "ScaleWriter",
                           "clamp", "record"},
    "autoscale.arrivals": {"LOCAL", "OTHER_MODELS", "ArrivalCounter", "ArrivalReader",
                           "ArrivalTotals", "FleetRateMeter", "FleetReading", "RateMeter",
                           "growth", "totals_of"},
    "autoscale.clock": {"Clock", "ScaledClock", "WallClock"},
    "autoscale.controller": {"Controller", "Elector", "ObservationError", "ObservationSource",
                             "Tick"},
    "autoscale.kube": {"KubeApi", "KubeConflict", "KubeError", "KubeNotFound", "KubeRejected",
                       "KubeUnavailable", "PodInfo", "Scale", "ScaleClient", "ScaleTarget",
                       "kube_configuration", "list_pods"},
    "autoscale.leader": {"LeaderElector", "LeaseRecord", "Verdict", "claimed", "judge",
                         "released"},
    "autoscale.metrics": {"ERROR_KINDS", "MAX_REASONS", "AutoscalerMetrics"},
    "autoscale.settings": {"AutoscalingSettings", "LeaderElectionSettings",
                           "ScaleTargetSettings"},
    "autoscale.sources": {"Freshness", "PodSource", "Reader", "TargetReader", "TargetState",
                          "observation"},
    "gateway.autoscaling": {"Autoscaler", "GatewaySource", "METRICS", "api_for", "build_autoscaler",
                            "build_embedded", "build_standalone", "run_standalone"},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_all_is_pinned_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    assert set(module.__all__) == EXPORTS[name]
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr}"
