"""Every kustomization under deploy/ renders with kubectl 1.20's kustomize v2 and every object
it renders validates against its schema (Kubernetes 1.30's OpenAPI for built-in kinds, the
published CRD schemas for RayCluster, ServiceMonitor, PodMonitor), offline; images are
pinned; generators list every file they should."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    CRD_SCHEMAS,
    DEPLOY,
    DEPLOYABLE,
    KUBECTL,
    KUSTOMIZATIONS,
    SCHEMAS,
    containers,
    find,
    problems,
    render,
)

# What kubectl 1.20's kustomize (v2.0.3) renders and the issue allows.
V2_KEYS = {"resources", "bases", "patchesStrategicMerge", "configMapGenerator", "images",
           "commonLabels", "namespace"}  # fmt: skip


def pinned(image: str) -> bool:
    """A reference with a digest, or a tag other than ``latest`` (none: latest implied)."""
    name, _, digest = image.partition("@")
    if digest:
        return re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    return tag != "latest" and re.fullmatch(r"\w[\w.-]{0,127}", tag) is not None


def _kustomization_dirs() -> set[str]:
    return {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")}


def test_kubectl_is_1_20_with_kustomize_v2() -> None:
    which = subprocess.run(["bash", str(KUBECTL), "--which"], capture_output=True, text=True,
                           timeout=600, check=True).stdout.strip()  # fmt: skip
    version = subprocess.run(["bash", str(KUBECTL), "version", "--client", "--short"],
                             capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    print(f"kubectl: {which}: {version.strip()}")
    assert which.startswith("apt "), f"scripts/kubectl.sh fell back to {which}, not 1.20"
    assert "v1.20." in version


def test_every_kustomization_is_tested_and_v2_only() -> None:
    assert _kustomization_dirs() == set(KUSTOMIZATIONS)
    for name in KUSTOMIZATIONS:
        data = yaml.safe_load((DEPLOY / name / "kustomization.yaml").read_text())
        assert set(data) <= V2_KEYS, (name, set(data) - V2_KEYS)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_and_validates(name: str) -> None:
    objs = render(name)
    assert objs, name
    found = {f"{o['kind']}/{o['metadata']['name']}": problems(o) for o in objs}
    assert {k: v for k, v in found.items() if v} == {}


@pytest.mark.parametrize("name", [n for n in DEPLOYABLE if n != "monitoring"])
def test_images_are_pinned(name: str) -> None:
    images = [c["image"] for o in render(name) for c in containers(o)]
    assert images
    for image in images:
        assert pinned(image), image


def test_no_latest_tag_anywhere_in_deploy() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".yml", ""}:
            assert ":latest" not in path.read_text(), path


@pytest.mark.parametrize(
    ("image", "ok"),
    [("redis:7.4.2", True), ("vllm/vllm-openai:v0.32.0", True), ("redis", False),
     ("redis:latest", False), ("r.io:5000/a/b:1.0", True), ("r.io:5000/a/b", False),
     ("a/b@sha256:" + "0" * 64, True)],
)  # fmt: skip
def test_pinned_rule(image: str, ok: bool) -> None:
    assert pinned(image) is ok


def _generated_files(name: str, generator: str) -> list[str]:
    data = yaml.safe_load((DEPLOY / name / "kustomization.yaml").read_text())
    (gen,) = [g for g in data["configMapGenerator"] if g["name"] == generator]
    return list(gen["files"])


def test_grafana_configmap_lists_every_dashboard() -> None:
    on_disk = sorted(str(p.relative_to(DEPLOY / "grafana"))
                     for p in (DEPLOY / "grafana" / "dashboards").glob("*.json"))  # fmt: skip
    assert on_disk, "no dashboards in deploy/grafana/dashboards"
    assert sorted(_generated_files("grafana", "switchyard-grafana-dashboards")) == on_disk
    cm = find(render("overlays/production"), "ConfigMap", "switchyard-grafana-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    for key, text in cm["data"].items():
        assert json.loads(text)["title"], key


def test_prometheus_configmap_lists_every_rules_file() -> None:
    rules = sorted(p.name for p in (DEPLOY / "prometheus").glob("rules*.yaml")
                   if not p.stem.endswith("_test"))  # fmt: skip
    listed = _generated_files("prometheus", "switchyard-prometheus")
    assert sorted(listed) == sorted(["prometheus.yml", *rules])
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert sorted(config["rule_files"]) == rules


def test_crd_schemas_say_where_they_come_from() -> None:
    for (api_version, kind), filename in CRD_SCHEMAS.items():
        data = json.loads((SCHEMAS / filename).read_text())
        assert f"{data['group']}/{data['version']}" == api_version
        assert data["kind"] == kind
        assert data["source"].startswith("https://github.com/")
        assert re.search(r"commit [0-9a-f]{40}", data["release"])
        assert data["openAPIV3Schema"]["type"] == "object"
    rendered = {(o["apiVersion"], o["kind"]) for n in DEPLOYABLE for o in render(n)}
    assert set(CRD_SCHEMAS) <= rendered  # every schema kept is used


def _edit(obj: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    cur: Any = out
    keys = path.split(".")
    for key in keys[:-1]:
        cur = cur[int(key)] if key.isdigit() else cur[key]
    cur[keys[-1]] = value
    return out


@pytest.mark.parametrize(
    ("name", "kind", "path", "value"),
    [
        ("overlays/production", "Deployment", "spec.template.spec.containers.0.imagee", "x"),
        ("overlays/production", "HorizontalPodAutoscaler", "spec.minReplicas", "two"),
        ("overlays/production", "Role", "rules.0.verb", ["get"]),
        ("kuberay", "RayCluster", "spec.headGroupSpec.rayStartParam", {}),
        ("kuberay", "RayCluster",
         "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limit", {}),
        ("monitoring", "PodMonitor", "spec.podMetricsEndpoints.0.intervall", "15s"),
        ("monitoring", "ServiceMonitor", "spec.endpoints", "http"),
    ],
)  # fmt: skip
def test_validation_catches_mistakes(name: str, kind: str, path: str, value: object) -> None:
    obj = next(o for o in render(name) if o["kind"] == kind)
    assert problems(obj) == []
    assert problems(_edit(obj, path, value)), (kind, path)


def test_schema_files_are_json_of_one_version() -> None:
    names = {p.name for p in SCHEMAS.glob("*.json")}
    assert names == set(CRD_SCHEMAS.values())
    assert (SCHEMAS / "README.md").is_file()
    assert Path(__file__).parent.joinpath("schemas", "extract.py").is_file()
