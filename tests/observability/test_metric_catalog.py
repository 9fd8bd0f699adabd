"""docs/metrics.md against the code, and the code's names against the rules.

Three checks: the page's generated part is what ``python -m gateway.metrics_catalog`` writes
now; every family of an app with every subsystem on is declared (and follows the naming
rules); and, after a short real run (a gateway in front of two enginesim engines serving
streamed, plain, completion and LoRA-adapter requests), every ``switchyard_`` family scraped
from ``/metrics`` is in the catalog with the same type and labels, each label value in its
declared set, and every always-on catalog family is exported.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.ports import free_port_block
from gateway.app import create_app
from gateway.metrics_catalog import (
    DOC,
    SPECS,
    catalog_settings,
    exported_families,
    main,
    problems,
    render,
    splice,
)
from gateway.metricspec import SUBSYSTEMS, Label, MetricSpec, naming_problems
from gateway.redislink import OPS
from gateway.settings import EngineConfig
from tests.gateway.conftest import gateway_settings
from tests.gateway.servers import ServerThread, wait_until
from tests.processes import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"
ADAPTER = "catalog-lora"


# -- the page and the declarations ------------------------------------------------------------
def test_docs_metrics_md_is_what_the_generator_writes() -> None:
    page = DOC.read_text()
    assert splice(page, render(SPECS, exported_families())) == page, (
        "docs/metrics.md is stale: run .venv/bin/python -m gateway.metrics_catalog"
    )
    assert main(["--check"]) == 0


def test_every_exported_family_is_declared_and_named_by_the_rules() -> None:
    families = exported_families()
    assert problems(SPECS, families) == []
    assert {s.name for s in SPECS} == set(families)
    assert {s.subsystem for s in SPECS} == set(SUBSYSTEMS)  # every heading has a table


def test_the_generator_refuses_a_stale_page_and_unknown_families(tmp_path: Path) -> None:
    page = tmp_path / "metrics.md"
    stale = DOC.read_text().replace("| `switchyard_proxy_requests_total` |", "| `renamed` |")
    page.write_text(stale)
    assert main(["--check", "--output", str(page)]) == 1
    assert main(["--output", str(page)]) == 0
    assert page.read_text() == DOC.read_text()
    with pytest.raises(ValueError, match="marker"):
        splice("no markers", "x")
    families = exported_families()
    extra = MetricSpec("switchyard_proxy_phantom_requests", "gauge", "requests")
    assert problems((*SPECS, extra), families) == [
        "switchyard_proxy_phantom_requests: declared but not exported with every subsystem on"
    ]
    assert problems(SPECS[1:], families) == [
        f"{SPECS[0].name}: exported but declared in no METRICS tuple"
    ]
    wrong_type = MetricSpec(SPECS[0].name, "gauge", SPECS[0].unit, SPECS[0].labels)
    assert any("declared gauge, exported counter" in p
               for p in problems((wrong_type, *SPECS[1:]), families))  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (MetricSpec("switchyard_proxy_requests_total", "counter", "requests"), []),
        (MetricSpec("switchyard_proxy_requests", "counter", "requests"), ["_total"]),
        (MetricSpec("switchyard_proxy_in_flight_requests_total", "gauge", "requests"),
         ["_total"]),
        (MetricSpec("switchyard_proxy_prefix_blocks", "histogram", "blocks"), ["seconds"]),
        (MetricSpec("switchyard_proxy_latency_ms", "histogram", "ms"),
         ["seconds", "no unit suffix"]),
        (MetricSpec("switchyard_outlier_ejected", "gauge", "ratio"), ["no unit suffix"]),
        (MetricSpec("switchyard_proxy_waiting_requests", "gauge", "seconds"), ["declared unit"]),
        (MetricSpec("switchyard_engine_slow_ratio", "gauge", "ratio"), ["subsystem"]),
        (MetricSpec("Switchyard_proxy_requests_total", "counter", "requests"),
         ["lower snake case", "subsystem"]),
        (MetricSpec("switchyard_proxy_requests_total", "counter", "requests",
                    (Label("request_id", bound="one per request"),)), ["unbounded or secret"]),
        (MetricSpec("switchyard_auth_failures_total", "counter", "failures",
                    (Label("api_key", bound="configuration"),)), ["unbounded or secret"]),
        (MetricSpec("switchyard_proxy_requests_total", "counter", "requests",
                    (Label("tenant"),)), ["neither a value set nor a bound"]),
        (MetricSpec("switchyard_proxy_requests_total", "counter", "requests",
                    (Label("le", values=("1",)),)), ["reserved"]),
    ],
)  # fmt: skip
def test_naming_rules(spec: MetricSpec, expected: list[str]) -> None:
    found = naming_problems(spec)
    assert len(found) == len(expected), found
    for fragment, problem in zip(expected, found, strict=True):
        assert fragment in problem


def test_value_sets_match_the_code_that_fills_them() -> None:
    """Labels whose values are string literals at the call sites: every literal is declared."""
    called = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        code = path.read_text()
        if path.name == "redislink.py":  # its docstring's example calls a made-up "get"
            code = code.split('"""', 2)[2]
        called |= set(re.findall(r"\.call\(\s*\"(\w+)\"", code))
        called |= set(re.findall(r"\bfailed\(\s*\"(\w+)\"", code))
    assert called and called <= set(OPS)
    actuator = (ROOT / "autoscale" / "actuator.py").read_text()
    limits = set(re.findall(r"Plan\([^()]*\"(\w+)\"\)", actuator))
    limit_label = next(
        label for spec in SPECS for label in spec.labels
        if spec.name == "switchyard_autoscaler_limited_decisions_total"
    )  # fmt: skip
    assert limits and limits == set(limit_label.values)
    sheds = set(re.findall(r"_shed\(\s*\"(\w+)\"|_count_shed\(\s*\"(\w+)\"",
                           (ROOT / "gateway" / "admission.py").read_text()))  # fmt: skip
    shed_values = {v for pair in sheds for v in pair if v}
    shed_label = next(label for spec in SPECS for label in spec.labels
                      if spec.name == "switchyard_admission_shed_requests_total")  # fmt: skip
    assert shed_values and shed_values <= set(shed_label.values)


def test_catalog_settings_turn_every_optional_subsystem_on(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    settings = catalog_settings(kubeconfig)
    assert settings.redis_url and settings.autoscaling.enabled
    assert settings.discovery.kind == "kubernetes"
    assert {s.when for s in SPECS} >= {"", "redis_url"}


# -- a short real run ---------------------------------------------------------------------------
@dataclass
class Sim:
    urls: list[str]
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    base = free_port_block(2)
    argv = [sys.executable, "-m", "enginesim", "--engines", "2", "--base-port", str(base),
            "--speed", "20", "--model", MODEL]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
    )
    urls = [f"http://127.0.0.1:{base + i}" for i in range(2)]

    def up() -> bool:
        try:
            return all(httpx.get(f"{u}/health", timeout=1).status_code == 200 for u in urls)
        except httpx.HTTPError:
            return proc.poll() is not None

    try:
        assert wait_until(up, timeout=90) and proc.poll() is None, "enginesim did not start"
        yield Sim(urls, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _scrape_after_traffic(sim: Sim, tmp_path: Path) -> str:
    adapter_dir = tmp_path / ADAPTER
    adapter_dir.mkdir()
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    load = {"lora_name": ADAPTER, "lora_path": str(adapter_dir)}
    httpx.post(f"{sim.urls[1]}/v1/load_lora_adapter", json=load, timeout=10).raise_for_status()
    engines = [EngineConfig(url=u, id=f"e{i}") for i, u in enumerate(sim.urls)]
    settings = gateway_settings(
        sim.urls, engines=engines,
        routing={"policy": "prefix-cache", "scrape_interval_s": 0.2},
        admission={"max_in_flight": 64},
    )  # fmt: skip
    with ServerThread(create_app(settings)) as gw, httpx.Client(timeout=30) as client:
        base = f"{gw.url}/v1"
        assert wait_until(
            lambda: ADAPTER in {m["id"] for m in client.get(f"{base}/models").json()["data"]}
        )
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 40}],
                "max_tokens": 8}  # fmt: skip
        for _ in range(3):
            streamed = client.post(f"{base}/chat/completions", json={**chat, "stream": True})
            assert streamed.status_code == 200 and "[DONE]" in streamed.text
        assert client.post(f"{base}/chat/completions", json=chat).status_code == 200
        completion = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 4}
        assert client.post(f"{base}/completions", json=completion).status_code == 200
        on_adapter = client.post(f"{base}/chat/completions", json={**chat, "model": ADAPTER})
        assert on_adapter.status_code == 200, on_adapter.text
        unknown = client.post(f"{base}/chat/completions", json={**chat, "model": "nope"})
        assert unknown.status_code == 404

        def scraped() -> bool:
            return "switchyard_endpoint_running_requests{" in client.get(f"{gw.url}/metrics").text

        assert wait_until(scraped, timeout=20)
        return client.get(f"{gw.url}/metrics").text


def test_a_real_run_exports_exactly_the_catalog(sim: Sim, tmp_path: Path) -> None:
    text = _scrape_after_traffic(sim, tmp_path)
    specs = {s.name: s for s in SPECS}
    seen: set[str] = set()
    bad: list[str] = []
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        if not name.startswith("switchyard_"):
            continue
        seen.add(name)
        spec = specs.get(name)
        if spec is None:
            bad.append(f"{name}: exported, not in the catalog")
            continue
        if spec.type != family.type:
            bad.append(f"{name}: {family.type}, catalog says {spec.type}")
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            if set(labels) != set(spec.label_names):
                bad.append(f"{sample.name}: labels {sorted(labels)}, catalog {spec.label_names}")
            for label in spec.labels:
                value = labels.get(label.name)
                if label.values and value not in label.values:
                    bad.append(f"{sample.name}: {label.name}={value!r} not in {label.values}")
    always = {s.name for s in SPECS if not s.when}
    bad += [f"{name}: in the catalog, not exported" for name in sorted(always - seen)]
    assert not bad, "\n".join(bad)
    assert not seen - always  # no Redis, discovery or autoscaler in this run
    assert "_created" not in text
    # The new series carry this run's traffic.
    samples = [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]

    def total(name: str, **labels: str) -> float:
        return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())

    assert total("switchyard_proxy_inter_token_latency_seconds_count", model=MODEL) >= 3
    assert total("switchyard_proxy_completion_tokens_total", model=MODEL) >= 3 * 2
    assert total("switchyard_proxy_prompt_tokens_total", model=MODEL) > 40
    assert total("switchyard_routing_prompt_blocks_total", policy="prefix-cache") >= 1
    assert total("switchyard_routing_adapter_decisions_total") == 1
    assert total("switchyard_proxy_requests_total", model=ADAPTER, endpoint="e1") == 1
    assert total("switchyard_proxy_requests_total", model=MODEL, status="200") == 5
