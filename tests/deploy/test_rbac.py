"""The gateway's Role grants exactly the Kubernetes calls the code makes, no more, no less.

The calls are read from the source of gateway/ and autoscale/ (tests/deploy/kubecalls.py:
the official client's typed methods and ``KubeApi.request`` with its resolved path), the
autoscaler's scale target from the switchyard.yaml each overlay deploys. A new call the Role
does not grant fails here, and so does a grant no call needs.
"""

from __future__ import annotations

import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import Settings
from tests.deploy.kubecalls import Access, CallSite, accesses, call_sites, resolve_access, sources
from tests.deploy.manifests import OVERLAYS, find, render

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "autoscale")
# The modules the brief names as the gateway's API callers; each must show up.
CALLERS = {
    "gateway/discovery.py",
    "gateway/adapter_source.py",
    "autoscale/kube.py",
    "autoscale/leader.py",
}


@cache
def _sites() -> tuple[CallSite, ...]:
    return tuple(call_sites(dict(sources(REPO, PACKAGES))))


def _settings(objs: tuple[dict[str, Any], ...], tmp_path: Path) -> Settings:
    cm = find(objs, "ConfigMap", "switchyard-config")
    path = tmp_path / "switchyard.yaml"
    path.write_text(cm["data"]["switchyard.yaml"])
    return Settings.load(path)


def _granted(role: dict[str, Any]) -> dict[Access, set[str]]:
    """Each (group, resource, verb) the Role grants -> its resourceNames (empty: any)."""
    out: dict[Access, set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), rule
                    access = Access(group, resource, verb)
                    assert access not in out, f"granted twice: {access}"
                    out[access] = set(rule.get("resourceNames") or ())
    return out


def test_the_callers_are_found() -> None:
    modules = {site.module for site in _sites()}
    assert modules >= CALLERS
    # autoscale/sources.py reads scales and pods through autoscale/kube.py (no calls of its own)
    assert "autoscale/sources.py" not in modules
    source = (REPO / "autoscale" / "sources.py").read_text()
    assert "list_pods(" in source and "ScaleClient(" in source


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_role_is_exactly_what_the_code_calls(overlay: str, tmp_path: Path) -> None:
    objs = render(f"overlays/{overlay}")
    settings = _settings(objs, tmp_path)
    target = settings.autoscaling.target.target()
    needed = accesses(_sites(), configured=[target.path])
    granted = _granted(find(objs, "Role", "switchyard"))
    missing = sorted(needed - set(granted))
    unused = sorted(set(granted) - needed)
    assert (missing, unused) == ([], []), f"Role lacks {missing}; grants unused {unused}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_named_grants_name_the_configured_objects(overlay: str, tmp_path: Path) -> None:
    objs = render(f"overlays/{overlay}")
    settings = _settings(objs, tmp_path)
    auto = settings.autoscaling
    assert settings.lora.configmap is not None
    granted = _granted(find(objs, "Role", "switchyard"))
    target = auto.target.target()
    named = {
        Access("apps", f"{target.resource}/scale", "get"): {target.name},
        Access("apps", f"{target.resource}/scale", "patch"): {target.name},
        Access("coordination.k8s.io", "leases", "get"): {auto.leader_election.lease_name},
        Access("coordination.k8s.io", "leases", "update"): {auto.leader_election.lease_name},
        Access("", "configmaps", "get"): {settings.lora.configmap.name},
    }
    for access, names in granted.items():
        # list, watch and create cannot be limited by name (the API server checks none)
        assert names == named.get(access, set()), access
    # The scale target and the Lease live in the gateway's namespace (set from the pod).
    assert find(objs, "Deployment", target.name)["kind"] == "Deployment"
    adapters = settings.lora.configmap
    assert adapters.key in find(objs, "ConfigMap", adapters.name)["data"]
    assert auto.leader_election.lease_namespace is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_role_is_bound_to_the_gateways_service_account(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    binding = find(objs, "RoleBinding", "switchyard")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "switchyard"}  # fmt: skip
    (subject,) = binding["subjects"]
    gateway = find(objs, "Deployment", "switchyard-gateway")["spec"]["template"]["spec"]
    assert subject["kind"] == "ServiceAccount"
    assert subject["name"] == gateway["serviceAccountName"]
    assert subject["namespace"] == binding["metadata"]["namespace"]
    find(objs, "ServiceAccount", subject["name"])
    # Nothing else in the namespace mounts an API token.
    for obj in objs:
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] != "switchyard-gateway":
            assert obj["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


# -- the reader of the code can fail: new calls are seen ---------------------------------------

_LEASES = """
    from urllib.parse import quote

    class Elector:
        def __init__(self, api, namespace):
            self.api = api
            self._path = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"

        async def drop(self, name):
            await self.api.request("DELETE", f"{self._path}/{quote(name)}")

        async def all(self):
            query = {"watch": "1"}
            return await self.api.request("GET", self._path, query=query)
"""

_TYPED = """
    def read(core, apps, ns):
        core.read_namespaced_pod("p", ns)
        core.list_namespaced_pod(ns, watch=True)
        apps.patch_namespaced_deployment_scale("d", ns, {})
        core.create_namespaced_pod_eviction("p", ns, {})
        httpx_client.request("GET", "http://engine/metrics")
"""


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (_LEASES, {Access("coordination.k8s.io", "leases", "delete"),
                   Access("coordination.k8s.io", "leases", "watch")}),
        (_TYPED, {Access("", "pods", "get"), Access("", "pods", "watch"),
                  Access("apps", "deployments/scale", "patch"),
                  Access("", "pods/eviction", "create")}),
    ],
)  # fmt: skip
def test_reader_sees_new_calls(source: str, expected: set[Access]) -> None:
    sites = call_sites({"x.py": textwrap.dedent(source)})
    assert accesses(sites) == expected


def test_a_runtime_only_resource_needs_a_configured_path() -> None:
    site = CallSite("x.py", 1, "PATCH", "/apis/{}/{}/namespaces/{}/{}/{}/scale", False)
    with pytest.raises(ValueError, match="known at run time only"):
        resolve_access(site)
    lws = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/ns/leaderworkersets/lws/scale"
    assert resolve_access(site, [lws]) == Access(
        "leaderworkerset.x-k8s.io", "leaderworkersets/scale", "patch"
    )
