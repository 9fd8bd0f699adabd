"""The served resources and the discovery documents kubectl and the clients read first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEPLOYMENTS",
    "KUBE_VERSION",
    "LEASES",
    "NAMESPACES",
    "PODS",
    "RESOURCES",
    "Resource",
    "api_group_list",
    "api_resource_list",
    "api_versions",
    "find_resource",
    "version_info",
]

KUBE_VERSION = (1, 29)
"""The Kubernetes release whose API the emulator answers as (its /version)."""


@dataclass(frozen=True, slots=True)
class Resource:
    plural: str
    singular: str
    kind: str
    group: str  # "" = core
    version: str
    namespaced: bool
    verbs: tuple[str, ...]
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


_RW = ("create", "delete", "get", "list", "patch", "update", "watch")

NAMESPACES = Resource("namespaces", "namespace", "Namespace", "", "v1", False,
                      ("create", "get", "list", "watch"), ("ns",))  # fmt: skip
PODS = Resource("pods", "pod", "Pod", "", "v1", True, _RW, ("po",), ("all",))
DEPLOYMENTS = Resource("deployments", "deployment", "Deployment", "apps", "v1", True, _RW,
                       ("deploy",), ("all",))  # fmt: skip
LEASES = Resource("leases", "lease", "Lease", "coordination.k8s.io", "v1", True, _RW)
RESOURCES: tuple[Resource, ...] = (NAMESPACES, PODS, DEPLOYMENTS, LEASES)

GROUPS: tuple[str, ...] = ("apps", "coordination.k8s.io")


def find_resource(group: str, version: str, plural: str) -> Resource | None:
    for r in RESOURCES:
        if r.group == group and r.version == version and r.plural == plural:
            return r
    return None


def version_info() -> dict[str, str]:
    major, minor = KUBE_VERSION
    return {
        "major": str(major),
        "minor": str(minor),
        "gitVersion": f"v{major}.{minor}.0-kube-sim",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.21.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def api_versions(server_address: str) -> dict[str, Any]:
    """``GET /api``."""
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def api_group_list() -> dict[str, Any]:
    """``GET /apis``."""
    groups = []
    for name in GROUPS:
        gv = {"groupVersion": f"{name}/v1", "version": "v1"}
        groups.append({"name": name, "versions": [gv], "preferredVersion": gv})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(name: str) -> dict[str, Any] | None:
    """``GET /apis/<group>``."""
    if name not in GROUPS:
        return None
    gv = {"groupVersion": f"{name}/v1", "version": "v1"}
    return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": [gv],
            "preferredVersion": gv}  # fmt: skip


def _entry(r: Resource) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": list(r.verbs),
    }
    if r.short_names:
        entry["shortNames"] = list(r.short_names)
    if r.categories:
        entry["categories"] = list(r.categories)
    return entry


def api_resource_list(group: str, version: str) -> dict[str, Any] | None:
    """``GET /api/v1`` or ``GET /apis/<group>/<version>`` (None: not served)."""
    served = [r for r in RESOURCES if r.group == group and r.version == version]
    if not served:
        return None
    entries = [_entry(r) for r in served]
    if group == "apps":
        entries.append({
            "name": "deployments/scale", "singularName": "", "namespaced": True,
            "group": "autoscaling", "version": "v1", "kind": "Scale",
            "verbs": ["get", "patch", "update"],
        })  # fmt: skip
        entries.append({"name": "deployments/status", "singularName": "", "namespaced": True,
                        "kind": "Deployment", "verbs": ["get"]})  # fmt: skip
    if group == "":
        entries.append({"name": "pods/status", "singularName": "", "namespaced": True,
                        "kind": "Pod", "verbs": ["get"]})  # fmt: skip
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": entries,
    }
