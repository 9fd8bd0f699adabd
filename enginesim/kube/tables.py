"""``meta.k8s.io/v1`` Table answers: what kubectl asks for (``Accept: application/json;as=Table;
v=v1;g=meta.k8s.io``) to print ``kubectl get`` with server-side columns."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Sequence
from typing import Any

from enginesim.kube.resources import Resource
from enginesim.kube.store import Obj

__all__ = ["human_age", "table", "wants_table"]

Column = tuple[str, str, str, int, Callable[[Obj, float], Any]]  # name, type, format, priority


def wants_table(accept: str) -> bool:
    """Whether the first acceptable media type that we serve is a meta.k8s.io Table."""
    for part in accept.split(","):
        params = [p.strip() for p in part.split(";")]
        media = params[0].lower()
        if media not in ("application/json", "*/*", "application/*"):
            continue
        return "as=Table" in params and "g=meta.k8s.io" in params
    return False


# kubectl's HumanDuration steps: (seconds per unit, unit, the smaller unit, below how many
# units the smaller one is shown too, below how many the unit alone is).
_AGE_STEPS = ((60, "m", "s", 10, 180), (3600, "h", "m", 8, 48), (86400, "d", "h", 8, 730))


def human_age(seconds: float) -> str:
    """kubectl's ``HumanDuration`` (e.g. ``45s``, ``3m12s``, ``5h``, ``2d3h``)."""
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    smaller_s = 1
    for unit_s, unit, smaller, both_below, alone_below in _AGE_STEPS:
        n, rest = s // unit_s, s % unit_s // smaller_s
        if n < both_below:
            return f"{n}{unit}{rest}{smaller}" if rest else f"{n}{unit}"
        if n < alone_below:
            return f"{n}{unit}"
        smaller_s = unit_s
    return f"{s // 86400 // 365}y"


def _age(obj: Obj, now: float) -> str:
    ts = str(obj["metadata"].get("creationTimestamp", ""))
    try:
        created = calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return "<unknown>"
    return human_age(now - created)


def _name(obj: Obj, _now: float) -> str:
    return str(obj["metadata"]["name"])


def _pod_ready(obj: Obj, _now: float) -> str:
    statuses = (obj.get("status") or {}).get("containerStatuses") or []
    total = len(statuses) or len((obj.get("spec") or {}).get("containers") or [])
    return f"{sum(1 for c in statuses if c.get('ready'))}/{total}"


def _pod_status(obj: Obj, _now: float) -> str:
    if "deletionTimestamp" in obj["metadata"]:
        return "Terminating"
    return str((obj.get("status") or {}).get("phase") or "Pending")


def _pod_restarts(obj: Obj, _now: float) -> int:
    statuses = (obj.get("status") or {}).get("containerStatuses") or []
    return sum(int(c.get("restartCount", 0)) for c in statuses)


def _status(key: str, default: Any = "<none>") -> Callable[[Obj, float], Any]:
    def get(obj: Obj, _now: float) -> Any:
        value = (obj.get("status") or {}).get(key)
        return default if value is None else value

    return get


def _deploy_ready(obj: Obj, _now: float) -> str:
    status = obj.get("status") or {}
    want = (obj.get("spec") or {}).get("replicas", 1)
    return f"{status.get('readyReplicas', 0)}/{want}"


def _holder(obj: Obj, _now: float) -> str:
    return str((obj.get("spec") or {}).get("holderIdentity") or "")


def _ns_status(obj: Obj, _now: float) -> str:
    return str((obj.get("status") or {}).get("phase") or "Active")


_AGE: Column = ("Age", "string", "", 0, _age)
_NAME: Column = ("Name", "string", "name", 0, _name)
COLUMNS: dict[str, Sequence[Column]] = {
    "pods": (
        _NAME,
        ("Ready", "string", "", 0, _pod_ready),
        ("Status", "string", "", 0, _pod_status),
        ("Restarts", "integer", "", 0, _pod_restarts),
        _AGE,
        ("IP", "string", "", 1, _status("podIP")),
        ("Node", "string", "", 1, lambda o, _n: (o.get("spec") or {}).get("nodeName", "<none>")),
    ),
    "deployments": (
        _NAME,
        ("Ready", "string", "", 0, _deploy_ready),
        ("Up-to-date", "integer", "", 0, _status("updatedReplicas", 0)),
        ("Available", "integer", "", 0, _status("availableReplicas", 0)),
        _AGE,
    ),
    "leases": (_NAME, ("Holder", "string", "", 0, _holder), _AGE),
    "namespaces": (_NAME, ("Status", "string", "", 0, _ns_status), _AGE),
}


def _row_object(obj: Obj, include: str) -> Obj | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"]}  # fmt: skip


def table(
    res: Resource, objs: Sequence[Obj], rv: int, include: str, now: float | None = None
) -> dict[str, Any]:
    """A Table of ``objs``; ``include`` is the ``includeObject`` query (default Metadata)."""
    at = time.time() if now is None else now
    cols = COLUMNS[res.plural]
    rows = []
    for obj in objs:
        row: dict[str, Any] = {"cells": [c[4](obj, at) for c in cols]}
        shown = _row_object(obj, include)
        if shown is not None:
            row["object"] = shown
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": str(rv)},
        "columnDefinitions": [
            {"name": n, "type": t, "format": f, "description": n, "priority": p}
            for n, t, f, p, _ in cols
        ],
        "rows": rows,
    }
