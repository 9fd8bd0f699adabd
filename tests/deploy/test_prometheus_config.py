"""deploy/prometheus/prometheus.yml: promtool accepts it, and its relabelling, applied to the
pods the overlays render, scrapes the gateways and the engines (each on its annotated port
and path, engines with ``endpoint`` = pod name, the gateway's engine id) and nothing else.

Debian's Prometheus 2.42 is built without Kubernetes service discovery (``promtool check
config`` rejects ``kubernetes_sd_configs``), so promtool checks a copy whose
``kubernetes_sd_configs`` are swapped for a static target, and this module applies the
relabel rules itself, as Prometheus does, to the meta labels kubernetes_sd gives a pod.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import OVERLAYS, find, pod_templates, render


def _config(overlay: str) -> tuple[dict[str, Any], dict[str, str]]:
    cm = find(render(f"overlays/{overlay}"), "ConfigMap", "switchyard-prometheus")
    return yaml.safe_load(cm["data"]["prometheus.yml"]), cm["data"]


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _meta(name: str, namespace: str, template: dict[str, Any]) -> dict[str, str]:
    """The labels kubernetes_sd (role pod) gives a running pod of ``template``."""
    meta = template["metadata"]
    labels = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": f"{name}-7d9f8-abcde",
        "__meta_kubernetes_pod_ip": "10.1.2.3",
        "__meta_kubernetes_pod_phase": "Running",
        "__address__": "10.1.2.3",
        "__metrics_path__": "/metrics",
    }
    for key, value in (meta.get("labels") or {}).items():
        labels[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
    for key, value in (meta.get("annotations") or {}).items():
        labels[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = value
    return labels


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus's relabelling (keep, drop, replace) of one target; None: dropped."""
    out = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(out.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(str(rule.get("regex", "(.*)")), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            result = match.expand(re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1")))
            if result:
                out[rule["target_label"]] = result
            else:
                out.pop(rule["target_label"], None)
    return {k: v for k, v in out.items() if not k.startswith("__meta_")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scrapes_gateways_and_engines_only(overlay: str) -> None:
    config, _ = _config(overlay)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"switchyard-gateway", "switchyard-engines"}
    objs = (*render(f"overlays/{overlay}"), *render("kuberay"))
    scraped: dict[str, set[str]] = {name: set() for name in jobs}
    for obj in objs:
        for where, template in pod_templates(obj):
            meta = _meta(obj["metadata"]["name"], obj["metadata"]["namespace"], template)
            for name, job in jobs.items():
                (sd,) = job["kubernetes_sd_configs"]
                assert sd == {"role": "pod", "namespaces": {"own_namespace": True}}
                target = _relabel(meta, job["relabel_configs"])
                if target is None:
                    continue
                scraped[name].add(f"{obj['metadata']['name']}:{where}")
                annotations = template["metadata"]["annotations"]
                assert target["__address__"] == f"10.1.2.3:{annotations['prometheus.io/port']}"
                assert target["__metrics_path__"] == annotations["prometheus.io/path"]
                assert target["pod"] == meta["__meta_kubernetes_pod_name"]
                if name == "switchyard-engines":
                    assert target["endpoint"] == meta["__meta_kubernetes_pod_name"]
                else:
                    assert "endpoint" not in target  # the gateway's series carry their own
    assert scraped == {
        "switchyard-gateway": {"switchyard-gateway:spec.template"},
        "switchyard-engines": {"switchyard-engine:spec.template",
                               "llama-70b:spec.headGroupSpec.template"},
    }  # fmt: skip


def test_relabel_reader() -> None:
    rules = [
        {"source_labels": ["a"], "regex": "x", "action": "keep"},
        {"source_labels": ["b", "c"], "regex": r"(.+);(\d+)", "replacement": "$1:$2",
         "target_label": "__address__"},
    ]  # fmt: skip
    assert _relabel({"a": "y"}, rules) is None
    assert _relabel({"a": "x", "b": "h", "c": "80"}, rules) == {
        "a": "x", "b": "h", "c": "80", "__address__": "h:80"
    }  # fmt: skip


def test_promtool_accepts_it(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make services installs Debian's prometheus)")
    config, files = _config("production")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    res = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr
