"""kubectl's Table answers (pure): when they are asked for, ages, cells."""

from __future__ import annotations

import pytest

from enginesim.kube.resources import DEPLOYMENTS, PODS
from enginesim.kube.tables import human_age, table, wants_table

KUBECTL_ACCEPT = (
    "application/json;as=Table;v=v1;g=meta.k8s.io,"
    "application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (KUBECTL_ACCEPT, True),
        ("application/json", False),
        ("", False),
        ("application/vnd.kubernetes.protobuf,application/json", False),
        ("application/json;as=Table;v=v1;g=meta.k8s.io", True),
    ],
)
def test_wants_table(accept: str, expected: bool) -> None:
    assert wants_table(accept) is expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (119, "119s"), (125, "2m5s"), (600, "10m"), (3 * 3600, "3h"),
     (5 * 3600 + 120, "5h2m"), (30 * 3600, "30h"), (3 * 86400 + 3600, "3d1h"),
     (100 * 86400, "100d"), (800 * 86400, "2y")],
)  # fmt: skip
def test_human_age(seconds: float, text: str) -> None:
    assert human_age(seconds) == text


def test_pod_and_deployment_rows() -> None:
    pod = {
        "metadata": {"name": "eng-abcde", "creationTimestamp": "2026-01-01T00:00:00Z",
                     "deletionTimestamp": "2026-01-01T00:01:00Z"},
        "spec": {"containers": [{"name": "c"}], "nodeName": "kube-sim"},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "containerStatuses": [{"ready": False, "restartCount": 0}]},
    }  # fmt: skip
    now = 1767225600.0 + 90  # 2026-01-01T00:01:30Z
    t = table(PODS, [pod], 7, "None", now=now)
    assert [c["name"] for c in t["columnDefinitions"]][:5] == [
        "Name", "Ready", "Status", "Restarts", "Age"
    ]  # fmt: skip
    assert t["rows"] == [{"cells": ["eng-abcde", "0/1", "Terminating", 0, "90s", "127.0.0.1",
                                    "kube-sim"]}]  # fmt: skip
    assert (t["kind"], t["apiVersion"], t["metadata"]) == (
        "Table", "meta.k8s.io/v1", {"resourceVersion": "7"}
    )  # fmt: skip
    dep = {"metadata": {"name": "eng", "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"replicas": 3}, "status": {"readyReplicas": 2, "updatedReplicas": 3,
                                               "availableReplicas": 2}}  # fmt: skip
    row = table(DEPLOYMENTS, [dep], 7, "Metadata", now=now)["rows"][0]
    assert row["cells"] == ["eng", "2/3", 3, 2, "90s"]
    assert row["object"]["kind"] == "PartialObjectMetadata"
