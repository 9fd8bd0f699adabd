"""Rendering deploy/ with kubectl 1.20's kustomize and validating what comes out, offline.

- :func:`render`: ``scripts/kubectl.sh kustomize deploy/<dir>`` (Debian's kubectl 1.20,
  kustomize v2 inside) parsed into objects.
- :func:`problems`: every object against its schema. Built-in kinds: kubernetes-validate's
  OpenAPI schemas of Kubernetes :data:`KUBERNETES_VERSION`, strict (an unknown field is an
  error, as the API server's strict field validation, kubectl's default since 1.27, makes
  it). Custom resources (RayCluster, ServiceMonitor, PodMonitor): the ``openAPIV3Schema`` of
  the published CRD kept in tests/deploy/schemas/ (README.md there says where from), made
  strict the same way; their embedded pod templates are also validated as built-in
  ``PodTemplate`` objects.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

__all__ = [
    "CRD_SCHEMAS",
    "DEPLOY",
    "KUBECTL",
    "KUBERNETES_VERSION",
    "KUSTOMIZATIONS",
    "OVERLAYS",
    "containers",
    "find",
    "pod_templates",
    "problems",
    "render",
]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBECTL = REPO / "scripts" / "kubectl.sh"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.30.0"
"""The Kubernetes version the built-in kinds are validated against (autoscaling/v2 and
policy/v1 are GA since 1.23, 1.21; 1.30 is the oldest minor still in the big clouds'
extended support in 2026)."""

OVERLAYS = ("cpu-sim", "production")
# Every kustomization under deploy/: the overlays (what gets applied), the add-ons applied
# beside them (KubeRay, Prometheus Operator objects) and the parts the overlays combine.
KUSTOMIZATIONS = (
    *(f"overlays/{name}" for name in OVERLAYS),
    "kuberay",
    "monitoring",
    "base",
    "engines/vllm",
    "engines/enginesim",
    "prometheus",
    "grafana",
)
DEPLOYABLE = (*(f"overlays/{name}" for name in OVERLAYS), "kuberay", "monitoring")

CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "ray.io_v1_raycluster.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json",
}


@cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize deploy/<kustomization>`` renders (cached per run)."""
    res = subprocess.run(
        ["bash", str(KUBECTL), "kustomize", str(DEPLOY / kustomization)],
        capture_output=True,
        text=True,
        timeout=600,  # the first run may download kubectl (scripts/kubectl.sh)
    )
    if res.returncode != 0:
        raise AssertionError(f"kubectl kustomize deploy/{kustomization}: {res.stderr}")
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def _strict(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    properties and does not preserve unknown fields (what the API server's strict field
    validation rejects), ``nullable`` turned into a JSON-schema null type."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    data = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    return jsonschema.Draft4Validator(_strict(data["openAPIV3Schema"]))


def _builtin(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(str(p) for p in exc.absolute_path)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def problems(obj: dict[str, Any]) -> list[str]:
    """What is wrong with one rendered object (empty: valid)."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key not in CRD_SCHEMAS:
        return _builtin(obj)
    found = [
        f"{'/'.join(str(p) for p in err.absolute_path)}: {err.message}"
        for err in crd_validator(*key).iter_errors(obj)
    ]
    for where, template in pod_templates(obj):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                   "template": template}  # fmt: skip
        found += [f"{where}: {p}" for p in _builtin(wrapped)]
    return found


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of a Deployment or a RayCluster."""
    spec = obj.get("spec") or {}
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet"):
        yield "spec.template", spec["template"]
    elif obj.get("kind") == "RayCluster":
        yield "spec.headGroupSpec.template", spec["headGroupSpec"]["template"]
        for i, group in enumerate(spec.get("workerGroupSpecs") or []):
            yield f"spec.workerGroupSpecs[{i}].template", group["template"]


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container (init containers too) of an object's pod templates."""
    for _, template in pod_templates(obj):
        pod = template.get("spec") or {}
        yield from pod.get("initContainers") or []
        yield from pod.get("containers") or []


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` named ``name`` (generated ConfigMaps: by name prefix)."""
    hits = [
        o for o in objs
        if o["kind"] == kind
        and (o["metadata"]["name"] == name or o["metadata"]["name"].startswith(f"{name}-"))
    ]  # fmt: skip
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]
