"""The configuration each overlay deploys loads with the gateway's real loader, and the
manifests agree with it: discovery's selector, label and annotation match the engine pods,
the autoscaler's target is the engine Deployment, the gateway's grace period covers
``server.graceful_shutdown_s``, probes, ports, Redis, the fleet-wide PYTHONHASHSEED."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from enginesim.core.profile import load_profile
from gateway.settings import Settings
from tests.deploy.manifests import OVERLAYS, containers, find, pod_templates, render

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _container(obj: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    found = [c for c in containers(obj) if name is None or c["name"] == name]
    assert len(found) == 1, (obj["metadata"]["name"], name)
    return found[0]


def _env(container: dict[str, Any], namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet sets it (literals and the namespace)."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
    return env


def _loaded(overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the gateway pod of ``overlay`` loads them: the ConfigMap's file plus the
    container's SWITCHYARD_* environment."""
    objs = render(f"overlays/{overlay}")
    gateway = find(objs, "Deployment", "switchyard-gateway")
    container = _container(gateway, "gateway")
    args = container["args"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert args[:2] == ["serve", "--config"]
    assert args[2] == f"{mount['mountPath']}/switchyard.yaml"
    volume = next(
        v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    cm = find(objs, "ConfigMap", "switchyard-config")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]  # the generated name
    path = tmp_path / "switchyard.yaml"
    path.write_text(cm["data"]["switchyard.yaml"])
    for name in [k for k in os.environ if k.startswith("SWITCHYARD_")]:
        monkeypatch.delenv(name)
    for name, value in _env(container, gateway["metadata"]["namespace"]).items():
        monkeypatch.setenv(name, value)
    return Settings.load(path)


def _matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selector (``a=b,c!=d,e``) against ``labels``."""
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term not in labels:
            return False
    return True


def _engines(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    names = ("vllm", "enginesim", "ray-head")
    return [o for o in objs if o["kind"] in ("Deployment", "RayCluster")
            and any(c["name"] in names for c in containers(o))]  # fmt: skip


def _argv(container: dict[str, Any]) -> list[str]:
    """The words the engine is started with: command + args, or the words of a ``bash -c``
    script (the KubeRay head's)."""
    command = [*(container.get("command") or []), *container["args"]]
    if command[0].endswith("sh") and "-c" in command:
        return shlex.split(command[command.index("-c") + 2].replace("\\\n", " "))
    return command


def _served_model(container: dict[str, Any]) -> str:
    for word in _argv(container):
        if word.startswith("--served-model-name="):
            return word.split("=", 1)[1]
        if word.startswith("--profile="):
            return load_profile(word.split("=", 1)[1]).model
    raise AssertionError(f"{container['name']}: no --served-model-name nor --profile")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_loads_with_the_real_settings(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _loaded(overlay, tmp_path, monkeypatch)
    assert s.server.host == "0.0.0.0"
    assert s.discovery.kind == "kubernetes"
    assert s.discovery.namespace == "switchyard"  # from the pod, not the file
    assert s.autoscaling.enabled and s.autoscaling.leader_election.enabled
    assert s.autoscaling.leader_election.identity is None  # one per pod: hostname_pid
    assert s.autoscaling.target.namespace == "switchyard"
    assert s.log_format == "json"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_discovery_finds_the_engine_pods_and_only_them(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _loaded(overlay, tmp_path, monkeypatch).discovery
    assert s.selector
    objs = (*render(f"overlays/{overlay}"), *render("kuberay"))
    engines = _engines(objs)
    assert {o["kind"] for o in engines} == {"Deployment", "RayCluster"}
    for obj in objs:
        for where, template in pod_templates(obj):
            labels = template["metadata"].get("labels") or {}
            is_engine = obj in engines and where in ("spec.template", "spec.headGroupSpec.template")
            assert _matches(s.selector, labels) is is_engine, (obj["metadata"]["name"], where)
            if not is_engine:
                continue
            engine = next(c for c in containers(obj) if c["name"] in ("vllm", "enginesim",
                                                                       "ray-head"))  # fmt: skip
            model = labels[s.model_label]
            assert LABEL_VALUE.match(model) and len(model) <= 63, model
            assert model == _served_model(engine)
            port = template["metadata"]["annotations"][s.port_annotation]
            http = next(p for p in engine["ports"] if p["name"] == "http")
            assert int(port) == http["containerPort"] == s.default_port
            assert engine["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_targets_the_engine_deployment(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = _loaded(overlay, tmp_path, monkeypatch).autoscaling
    objs = render(f"overlays/{overlay}")
    assert (auto.target.api_version, auto.target.kind) == ("apps/v1", "Deployment")
    engine = find(objs, "Deployment", auto.target.name)
    assert engine in _engines(objs)
    # The autoscaler and the gateway's HPA own replicas: a re-apply must not reset them.
    assert "replicas" not in engine["spec"]
    assert "replicas" not in find(objs, "Deployment", "switchyard-gateway")["spec"]
    assert auto.port_annotation in engine["spec"]["template"]["metadata"]["annotations"]
    assert auto.min_replicas <= auto.max_replicas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_pod(overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _loaded(overlay, tmp_path, monkeypatch)
    objs = render(f"overlays/{overlay}")
    gateway = find(objs, "Deployment", "switchyard-gateway")
    pod = gateway["spec"]["template"]["spec"]
    c = _container(gateway, "gateway")
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + s.server.graceful_shutdown_s
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    http = next(p for p in c["ports"] if p["name"] == "http")
    assert http["containerPort"] == s.server.port
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert pod["topologySpreadConstraints"]
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        obj = find(objs, kind, "switchyard-gateway")
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    hpa = find(objs, "HorizontalPodAutoscaler", "switchyard-gateway")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "switchyard-gateway"
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert s.limits.replicas == hpa["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_where_the_config_points(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _loaded(overlay, tmp_path, monkeypatch)
    objs = render(f"overlays/{overlay}")
    service = find(objs, "Service", "switchyard-redis")
    assert (
        s.redis_url
        == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    )
    redis = _container(find(objs, "Deployment", "switchyard-redis"), "redis")
    args = redis["args"]
    persistence_off = (
        "--save" in args
        and args[args.index("--save") + 1] == ""
        and (args[args.index("--appendonly") + 1] == "no")
    )
    assert persistence_off is (overlay == "production")


def test_production_spreads_gateways_over_nodes() -> None:
    objs = render("overlays/production")
    pod = find(objs, "Deployment", "switchyard-gateway")["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    meta = find(objs, "Deployment", "switchyard-gateway")["spec"]["template"]["metadata"]
    assert term["labelSelector"]["matchLabels"].items() <= meta["labels"].items()
    assert find(objs, "HorizontalPodAutoscaler", "switchyard-gateway")["spec"]["minReplicas"] >= 2


def test_engines_share_one_pythonhashseed_and_vllm_flags() -> None:
    objs = (*render("overlays/production"), *render("overlays/cpu-sim"), *render("kuberay"))
    seeds = set()
    for obj in objs:
        for c in containers(obj):
            if c["name"] in ("vllm", "enginesim", "ray-head", "ray-worker"):
                (seed,) = [e["value"] for e in c["env"] if e["name"] == "PYTHONHASHSEED"]
                seeds.add(seed)
    assert len(seeds) == 1 and seeds.pop().isdigit()
    for obj in (*render("overlays/production"), *render("kuberay")):
        for c in containers(obj):
            if c["name"] not in ("vllm", "ray-head"):
                continue
            words = _argv(c)
            assert "--enable-lora" in words
            (kv,) = [w.split("=", 1)[1] for w in words if w.startswith("--kv-events-config=")]
            kv_config = json.loads(kv)
            assert kv_config["enable_kv_cache_events"] is True
            assert kv_config["publisher"] == "zmq"
            kv_port = int(kv_config["endpoint"].rsplit(":", 1)[1])
            assert kv_port in [p["containerPort"] for p in c["ports"]]
            assert c["startupProbe"]["httpGet"]["path"] == "/health"
            assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    head = find(render("kuberay"), "RayCluster", "llama-70b")
    (ray_head,) = head["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert "--distributed-executor-backend=ray" in ray_head["args"][0]
    assert "$KUBERAY_GEN_RAY_START_CMD" in ray_head["args"][0]
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


def test_label_selector_reader() -> None:
    assert _matches("a=b,c", {"a": "b", "c": "x"})
    assert not _matches("a=b", {"a": "c"})
    assert not _matches("a!=b", {"a": "b"})
    assert not _matches("c", {"a": "b"})
    assert _matches("a==b", {"a": "b"})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_environment_override_takes_effect(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic-settings ignores an unknown SWITCHYARD_* variable: a misspelt override would
    silently do nothing, so each one must show in the loaded settings."""
    s = _loaded(overlay, tmp_path, monkeypatch)
    gateway = find(render(f"overlays/{overlay}"), "Deployment", "switchyard-gateway")
    env = _env(_container(gateway, "gateway"), gateway["metadata"]["namespace"])
    assert env
    for name, value in env.items():
        assert name.startswith("SWITCHYARD_"), name
        node: Any = s
        for part in name.removeprefix("SWITCHYARD_").lower().split("__"):
            node = getattr(node, part)
        assert str(node) == value, name
