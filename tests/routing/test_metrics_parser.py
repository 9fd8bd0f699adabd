from __future__ import annotations

import pytest

from routing.metrics_parser import EngineMetrics, MetricsParseError, parse_vllm_metrics

V1 = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.6
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 250.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="llama"} 5000.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="llama"} 700.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="llama"} 7.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="llama"} 3.0
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="llama"} 2.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",num_gpu_blocks="27000"} 1.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.8e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.6e9
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 1.5
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_count{engine="0",model_name="llama"} 100.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="llama"} 2.0
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.0
"""

OLD = """# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.7
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{model_name="m"} 80.0
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{model_name="m"} 20.0
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_count{model_name="m"} 4.0
vllm:time_per_output_token_seconds_sum{model_name="m"} 0.2
"""

# An engine in a deprecation window exports both names; the new one must win, in any order.
BOTH = (
    OLD
    + """# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.3
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{model_name="m"} 90.0
"""
)


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        (V1, "running", 5),
        (V1, "waiting", 4),
        (V1, "kv_usage", pytest.approx(0.4)),
        (V1, "prefix_queries", 1000.0),
        (V1, "prefix_hits", 250.0),
        (V1, "prefix_hit_rate", 0.25),
        (V1, "prompt_tokens", 5000.0),
        (V1, "generation_tokens", 700.0),
        (V1, "requests_finished", 10.0),
        (V1, "preemptions", 2.0),
        (V1, "block_size", 16),
        (V1, "num_gpu_blocks", 27000),
        (V1, "max_lora", 4),
        (V1, "running_adapters", frozenset({"a", "b"})),
        (V1, "waiting_adapters", frozenset({"c"})),
        (V1, "model_names", frozenset({"llama"})),
        (V1, "ttft_count", 10.0),
        (V1, "ttft_sum_s", 1.5),
        (V1, "itl_sum_s", 2.0),
        (V1, "has_kv_usage", True),
        (OLD, "kv_usage", pytest.approx(0.7)),
        (OLD, "prefix_queries", 80.0),
        (OLD, "prefix_hits", 20.0),
        (OLD, "itl_count", 4.0),
        (OLD, "block_size", None),
        (BOTH, "kv_usage", pytest.approx(0.3)),
        (BOTH, "prefix_queries", 90.0),
        (BOTH, "prefix_hits", 20.0),
        ("", "running", 0),
        ("", "prefix_hit_rate", None),
        ("", "has_kv_usage", False),
        # Series routing does not read are skipped, labels and all.
        ('other_series{model_name="x"} 1\n', "model_names", frozenset()),
        ('vllm:unread_series{model_name="x"} 1\n', "model_names", frozenset()),
        ('vllm:unread_series{engine="0"} 7\n', "running", 0),
    ],
)
def test_parse_fields(text: str, field: str, expected: object) -> None:
    assert getattr(parse_vllm_metrics(text), field) == expected


def test_new_name_first_then_old_is_ignored() -> None:
    text = """vllm:prefix_cache_hits_total{model_name="m"} 5.0
vllm:gpu_prefix_cache_hits_total{model_name="m"} 50.0
vllm:prefix_cache_hits_total{model_name="n"} 6.0
"""
    assert parse_vllm_metrics(text).prefix_hits == 11.0


def test_bad_label_values_are_tolerated() -> None:
    text = 'vllm:cache_config_info{block_size="n/a",num_gpu_blocks="x"} 1.0\n'
    m = parse_vllm_metrics(text)
    assert (m.block_size, m.num_gpu_blocks) == (None, None)


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf"])
def test_non_finite_values_are_left_out(value: str) -> None:
    """An engine exporting NaN/Inf must not crash a scrape (int() of it raised)."""
    text = f"""vllm:num_requests_running{{model_name="m"}} {value}
vllm:num_requests_running{{model_name="n"}} 2.0
vllm:num_requests_waiting{{model_name="m"}} {value}
vllm:kv_cache_usage_perc{{model_name="m"}} {value}
"""
    m = parse_vllm_metrics(text)
    assert (m.running, m.waiting, m.kv_usage) == (2, 0, 0.0)


@pytest.mark.parametrize("text", ['vllm:x{a="1" 2\n', "vllm:num_requests_running abc\n"])
def test_invalid_text_raises(text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_vllm_metrics(text)


def test_defaults_are_empty() -> None:
    assert EngineMetrics().running_adapters == frozenset()
