"""gateway.pods: which pods are engines (table), and the reconcile plan (table)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from gateway.pods import (
    BAD_PORT,
    CHANGED,
    DELETED,
    FINISHED,
    GONE,
    NO_IP,
    NO_NAME,
    NOT_READY,
    READY,
    TERMINATING,
    Change,
    PodEndpoint,
    PodRules,
    PodVerdict,
    pod_verdict,
    reconcile,
)

RULES = PodRules()


def pod(
    name: str = "engine-0",
    *,
    ip: str | None = "10.0.0.7",
    ready: str | None = "True",
    phase: str = "Running",
    deleting: bool = False,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "resourceVersion": "5"}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2026-12-07T09:00:00Z"
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
    if ready is not None:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": ready},
        ]
    return {"metadata": meta, "status": status}


MODEL = {"switchyard.io/model": "smollm2"}


@pytest.mark.parametrize(
    ("case", "doc", "url", "models", "reason"),
    [
        ("ready, defaults", pod(), "http://10.0.0.7:8000", (), READY),
        ("model label", pod(labels=MODEL), "http://10.0.0.7:8000", ("smollm2",), READY),
        ("port annotation", pod(annotations={"switchyard.io/port": "9001"}),
         "http://10.0.0.7:9001", (), READY),
        ("port annotation with blanks", pod(annotations={"switchyard.io/port": " 81 "}),
         "http://10.0.0.7:81", (), READY),
        ("ipv6", pod(ip="fd00::7"), "http://[fd00::7]:8000", (), READY),
        ("empty model label", pod(labels={"switchyard.io/model": ""}),
         "http://10.0.0.7:8000", (), READY),
        ("not ready", pod(ready="False"), None, (), NOT_READY),
        ("no conditions yet", pod(ready=None), None, (), NOT_READY),
        ("terminating though ready", pod(deleting=True), None, (), TERMINATING),
        ("no ip", pod(ip=None), None, (), NO_IP),
        ("succeeded", pod(phase="Succeeded"), None, (), FINISHED),
        ("failed", pod(phase="Failed"), None, (), FINISHED),
        ("port not a number", pod(annotations={"switchyard.io/port": "http"}), None, (), BAD_PORT),
        ("port out of range", pod(annotations={"switchyard.io/port": "70000"}), None, (),
         BAD_PORT),
        ("port zero", pod(annotations={"switchyard.io/port": "0"}), None, (), BAD_PORT),
        ("no name", {"metadata": {}, "status": {}}, None, (), NO_NAME),
        ("garbage", {"metadata": "x", "status": ["y"]}, None, (), NO_NAME),
        ("conditions not a list", {"metadata": {"name": "p"}, "status": {"conditions": "x"}},
         None, (), NOT_READY),
    ],
)  # fmt: skip
def test_pod_verdict(
    case: str, doc: dict[str, Any], url: str | None, models: tuple[str, ...], reason: str
) -> None:
    verdict = pod_verdict(doc, RULES)
    assert verdict.reason == reason, case
    if url is None:
        assert verdict.endpoint is None, case
    else:
        assert verdict.endpoint == PodEndpoint(verdict.name, url, models), case


def test_custom_rules() -> None:
    rules = PodRules(model_label="m", port_annotation="p", default_port=7000, scheme="https")
    verdict = pod_verdict(pod(labels={"m": "llama"}), rules)
    assert verdict.endpoint == PodEndpoint("engine-0", "https://10.0.0.7:7000", ("llama",))
    assert pod_verdict(pod(annotations={"p": "7443"}), rules).endpoint == PodEndpoint(
        "engine-0", "https://10.0.0.7:7443"
    )


@pytest.mark.parametrize(
    ("annotation", "kv_events"),
    [
        ("5557", "tcp://10.0.0.7:5557"),
        (" 6000 ", "tcp://10.0.0.7:6000"),
        ("tcp://*:5557", None),  # a port, not an endpoint: ignored, the pod still serves
        ("0", None),
        (None, None),
    ],
)
def test_kv_events_port_annotation(annotation: str | None, kv_events: str | None) -> None:
    notes = {} if annotation is None else {"switchyard.io/kv-events-port": annotation}
    verdict = pod_verdict(pod(annotations=notes), RULES)
    assert verdict.reason == READY
    assert verdict.endpoint == PodEndpoint("engine-0", "http://10.0.0.7:8000", (), kv_events)


def test_kv_events_on_an_ipv6_pod() -> None:
    doc = pod(ip="fd00::7", annotations={"switchyard.io/kv-events-port": "5557"})
    endpoint = pod_verdict(doc, RULES).endpoint
    assert endpoint is not None and endpoint.kv_events == "tcp://[fd00::7]:5557"


def test_a_v1pod_serialised_to_wire_json_reads_the_same() -> None:
    v1 = client.V1Pod(
        metadata=client.V1ObjectMeta(name="p1", labels=MODEL,
                                     annotations={"switchyard.io/port": "8123"}),
        status=client.V1PodStatus(pod_ip="10.1.2.3", phase="Running", conditions=[
            client.V1PodCondition(type="Ready", status="True")]),
    )  # fmt: skip
    wire = client.ApiClient().sanitize_for_serialization(v1)  # type: ignore[no-untyped-call]
    verdict = pod_verdict(wire, RULES)
    assert verdict.endpoint == PodEndpoint("p1", "http://10.1.2.3:8123", ("smollm2",))


A = PodEndpoint("a", "http://10.0.0.1:8000", ("m",))
A2 = PodEndpoint("a", "http://10.0.0.9:8000", ("m",))
B = PodEndpoint("b", "http://10.0.0.2:8000", ("m",))


def ok(ep: PodEndpoint) -> PodVerdict:
    return PodVerdict(ep.id, ep, READY)


def out(name: str, reason: str) -> PodVerdict:
    return PodVerdict(name, None, reason)


@pytest.mark.parametrize(
    ("case", "owned", "verdicts", "complete", "changes"),
    [
        ("new pod", {}, [ok(A)], True, [Change("add", A, READY)]),
        ("unchanged", {"a": A}, [ok(A)], True, []),
        ("not ready any more", {"a": A}, [out("a", NOT_READY)], False,
         [Change("remove", A, NOT_READY)]),
        ("terminating", {"a": A}, [out("a", TERMINATING)], False,
         [Change("remove", A, TERMINATING)]),
        ("deleted event", {"a": A}, [out("a", DELETED)], False, [Change("remove", A, DELETED)]),
        ("not ready, never owned", {}, [out("a", NOT_READY)], True, []),
        ("url changed: remove then add", {"a": A}, [ok(A2)], False,
         [Change("remove", A, CHANGED), Change("add", A2, READY)]),
        ("absent from a full list", {"a": A, "b": B}, [ok(B)], True,
         [Change("remove", A, GONE)]),
        ("absent from one event: kept", {"a": A, "b": B}, [ok(B)], False, []),
        ("removes before adds", {"a": A}, [ok(B), out("a", NOT_READY)], True,
         [Change("remove", A, NOT_READY), Change("add", B, READY)]),
        ("empty list removes all", {"a": A, "b": B}, [], True,
         [Change("remove", A, GONE), Change("remove", B, GONE)]),
    ],
)  # fmt: skip
def test_reconcile(
    case: str,
    owned: dict[str, PodEndpoint],
    verdicts: list[PodVerdict],
    complete: bool,
    changes: list[Change],
) -> None:
    assert reconcile(owned, verdicts, complete=complete) == changes, case


def test_exports() -> None:
    from gateway import pods

    assert pods.__all__ == sorted(pods.__all__, key=lambda n: (not n.isupper(), n))
    assert all(hasattr(pods, name) for name in pods.__all__)
