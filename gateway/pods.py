"""Pods -> engine endpoints, pure: what Kubernetes discovery registers for a pod, or why not.

:mod:`gateway.discovery` reads pods as the API server sends them (wire JSON, camelCase keys;
it never builds ``V1Pod`` models) and asks :func:`pod_verdict` what each one means: an
endpoint to route to, or a reason it is not one. :func:`reconcile` turns verdicts into the
adds and removes that bring the engines discovery owns to the pods' state. No I/O, no
client; table tests in tests/gateway/test_pods.py.

What a pod must show to be an engine (docs/kubernetes.md):

- ``status.podIP`` set, ``metadata.deletionTimestamp`` unset (a deleted pod drains: new
  requests go elsewhere at once), phase not ``Succeeded``/``Failed``, and the ``Ready``
  condition ``True``;
- the port from the annotation ``rules.port_annotation`` (default ``switchyard.io/port``),
  else ``rules.default_port``; an annotation that is not a port keeps the pod out;
- the served model from the label ``rules.model_label`` (default ``switchyard.io/model``),
  registered as the endpoint's static models so routing works before ``/v1/models`` is read;
- the KV-event publisher's port from the annotation ``rules.kv_events_annotation`` (default
  ``switchyard.io/kv-events-port``; vLLM's ``--kv-events-config`` endpoint ``tcp://*:PORT``),
  subscribed at ``tcp://{podIP}:PORT``; absent or not a port: no KV events for that pod.

Example::

    verdict = pod_verdict(pod, PodRules())
    verdict.endpoint  # PodEndpoint(id="engine-7d9f-x2", url="http://10.0.3.7:8000", ...)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BAD_PORT",
    "CHANGED",
    "DELETED",
    "FINISHED",
    "GONE",
    "NOT_READY",
    "NO_IP",
    "NO_NAME",
    "READY",
    "TERMINATING",
    "Change",
    "PodEndpoint",
    "PodRules",
    "PodVerdict",
    "pod_name",
    "pod_verdict",
    "reconcile",
]

READY = "ready"
"""The reason of a verdict with an endpoint; the others name why a pod is not one."""
TERMINATING = "terminating"
NOT_READY = "not_ready"
NO_IP = "no_ip"
BAD_PORT = "bad_port"
FINISHED = "finished"
DELETED = "deleted"  # a DELETED watch event
GONE = "gone"  # absent from a full list
CHANGED = "changed"  # its url or model changed: removed, then added again
NO_NAME = "no_name"


@dataclass(frozen=True, slots=True)
class PodRules:
    """Where a pod keeps its model and port, and how its url is written."""

    model_label: str = "switchyard.io/model"
    port_annotation: str = "switchyard.io/port"
    default_port: int = 8000
    scheme: str = "http"
    kv_events_annotation: str = "switchyard.io/kv-events-port"


@dataclass(frozen=True, slots=True)
class PodEndpoint:
    """An engine as a pod describes it: id = pod name."""

    id: str
    url: str
    models: tuple[str, ...] = ()
    kv_events: str | None = None  # tcp://{podIP}:{port} of its KV-event publisher, if any


@dataclass(frozen=True, slots=True)
class PodVerdict:
    """One pod judged: ``endpoint`` when it should serve, else None and ``reason`` says why."""

    name: str
    endpoint: PodEndpoint | None
    reason: str


@dataclass(frozen=True, slots=True)
class Change:
    """One step of :func:`reconcile`: add or remove ``endpoint`` (for a remove, the one
    registered), with the reason logged beside it."""

    op: Literal["add", "remove"]
    endpoint: PodEndpoint
    reason: str


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _ready(status: Mapping[str, Any]) -> bool:
    conditions = status.get("conditions")
    for cond in conditions if isinstance(conditions, list) else ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _port(annotations: Mapping[str, Any], rules: PodRules) -> int | None:
    raw = annotations.get(rules.port_annotation)
    if raw is None:
        return rules.default_port
    return _port_number(raw)


def _port_number(raw: Any) -> int | None:
    text = str(raw).strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        return None
    return int(text)


def pod_name(pod: Mapping[str, Any]) -> str:
    name = _mapping(pod.get("metadata")).get("name")
    return name if isinstance(name, str) else ""


def pod_verdict(pod: Mapping[str, Any], rules: PodRules) -> PodVerdict:
    """Judge one pod (wire JSON); see the module docstring for the rules."""
    meta = _mapping(pod.get("metadata"))
    status = _mapping(pod.get("status"))
    name = pod_name(pod)
    if not name:
        return PodVerdict(name, None, NO_NAME)
    if meta.get("deletionTimestamp"):
        return PodVerdict(name, None, TERMINATING)
    if status.get("phase") in ("Succeeded", "Failed"):
        return PodVerdict(name, None, FINISHED)
    if not _ready(status):
        return PodVerdict(name, None, NOT_READY)
    ip = status.get("podIP")
    if not isinstance(ip, str) or not ip:
        return PodVerdict(name, None, NO_IP)
    annotations = _mapping(meta.get("annotations"))
    port = _port(annotations, rules)
    if port is None:
        return PodVerdict(name, None, BAD_PORT)
    host = f"[{ip}]" if ":" in ip else ip
    model = _mapping(meta.get("labels")).get(rules.model_label)
    models = (model,) if isinstance(model, str) and model else ()
    kv_raw = annotations.get(rules.kv_events_annotation)
    kv_port = None if kv_raw is None else _port_number(kv_raw)
    kv_events = f"tcp://{host}:{kv_port}" if kv_port is not None else None
    url = f"{rules.scheme}://{host}:{port}"
    return PodVerdict(name, PodEndpoint(name, url, models, kv_events), READY)


def reconcile(
    owned: Mapping[str, PodEndpoint], verdicts: Iterable[PodVerdict], *, complete: bool
) -> list[Change]:
    """The changes that bring ``owned`` (the engines discovery registered) to ``verdicts``.
    ``complete``: the verdicts are a full list, so an owned engine without one is gone;
    else (a watch event) only the pods named change. Removes come before adds."""
    removes: list[Change] = []
    adds: list[Change] = []
    seen: set[str] = set()
    for verdict in verdicts:
        seen.add(verdict.name)
        old = owned.get(verdict.name)
        new = verdict.endpoint
        if new == old:
            continue
        if old is not None:
            removes.append(Change("remove", old, CHANGED if new is not None else verdict.reason))
        if new is not None:
            adds.append(Change("add", new, verdict.reason))
    if complete:
        removes.extend(Change("remove", ep, GONE) for eid, ep in owned.items() if eid not in seen)
    return removes + adds
