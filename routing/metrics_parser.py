"""Parse a vLLM ``/metrics`` page into one frozen :class:`EngineMetrics` value.

The scraper (gateway side, I/O) fetches the text; this module only turns text into numbers so
it can be table-tested against real vLLM output. Names follow vLLM V1 (vllm-contract.md §5);
the removed V0 names (``gpu_cache_usage_perc``, ``gpu_prefix_cache_*``) are accepted as
fallbacks so an older engine still yields a usable signal instead of silently zeros (the
failure peers hit, production-stack#617).

Series with several label sets (one per data-parallel ``engine`` or per ``model_name``) are
summed for request gauges and counters and averaged for ``kv_cache_usage_perc``.
``vllm:lora_requests_info`` is special: its *value* is the update timestamp, so the series
with the largest value wins (vllm-contract.md §5.2).

Only the series named here are handed to the Prometheus parser: a vLLM page is mostly
histogram buckets routing never reads, and parsing all of it took ~8 ms per 31 KB enginesim
page -- 33 ms of a gateway's event loop per 4-engine scrape round, every 0.5 s, during which
no request was routed or relayed. Every other line is still checked against a cheap
exposition-format pattern, so a garbled page is rejected as before.

Example::

    m = parse_vllm_metrics(text)
    m.waiting, m.kv_usage, m.block_size
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["WANTED_SERIES", "EngineMetrics", "MetricsParseError", "parse_vllm_metrics"]


class MetricsParseError(ValueError):
    """The page is not Prometheus text exposition format."""


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """The routing-relevant part of one engine's ``/metrics`` page.

    Counters are cumulative totals (callers take deltas); ``None`` means the engine did not
    export the metric. Example: ``EngineMetrics(running=3, waiting=1, kv_usage=0.42)``.
    """

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    requests_finished: float = 0.0
    preemptions: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    max_lora: int | None = None
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    model_names: frozenset[str] = frozenset()
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    itl_sum_s: float = 0.0
    itl_count: float = 0.0
    has_kv_usage: bool = False

    @property
    def prefix_hit_rate(self) -> float | None:
        """Cumulative hit rate (hits / queries, in tokens); ``None`` before any query."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries > 0 else None


# Sample name -> (field, priority). Lower priority wins when both the new and the old name
# are present (an engine in a deprecation window exports both).
_SUMMED: dict[str, tuple[str, int]] = {
    "vllm:num_requests_running": ("running", 0),
    "vllm:num_requests_waiting": ("waiting", 0),
    "vllm:prefix_cache_queries_total": ("prefix_queries", 0),
    "vllm:prefix_cache_hits_total": ("prefix_hits", 0),
    "vllm:gpu_prefix_cache_queries_total": ("prefix_queries", 1),
    "vllm:gpu_prefix_cache_hits_total": ("prefix_hits", 1),
    "vllm:prompt_tokens_total": ("prompt_tokens", 0),
    "vllm:generation_tokens_total": ("generation_tokens", 0),
    "vllm:request_success_total": ("requests_finished", 0),
    "vllm:num_preemptions_total": ("preemptions", 0),
    "vllm:time_to_first_token_seconds_sum": ("ttft_sum_s", 0),
    "vllm:time_to_first_token_seconds_count": ("ttft_count", 0),
    "vllm:inter_token_latency_seconds_sum": ("itl_sum_s", 0),
    "vllm:inter_token_latency_seconds_count": ("itl_count", 0),
    "vllm:time_per_output_token_seconds_sum": ("itl_sum_s", 1),
    "vllm:time_per_output_token_seconds_count": ("itl_count", 1),
}
_KV_NAMES = {"vllm:kv_cache_usage_perc": 0, "vllm:gpu_cache_usage_perc": 1}
_INFO_NAMES = ("vllm:cache_config_info", "vllm:lora_requests_info")
_WANTED = frozenset((*_SUMMED, *_KV_NAMES, *_INFO_NAMES))
WANTED_SERIES: tuple[str, ...] = tuple(sorted(_WANTED))
"""Sample names routing reads, for a scraper to ask for with Prometheus' ``name[]`` filter
(``?name[]=a&name[]=b``, honoured by prometheus_client's exposition app, which vLLM 0.32
mounts at ``/metrics/``; its ``/metrics`` ignores it): the page shrinks from every histogram
bucket to ~20 lines. A whole page still works: :func:`parse_vllm_metrics` picks these out."""
_SAMPLE_LINE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?[ \t]+\S")
"""A sample line's shape: metric name, optional label set, whitespace, a value."""


def _split(names: str) -> frozenset[str]:
    return frozenset(n.strip() for n in names.split(",") if n.strip())


def _int_label(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


@dataclass(slots=True)
class _Acc:
    """Mutable accumulator used only inside :func:`parse_vllm_metrics`."""

    sums: dict[str, tuple[int, float]]
    kv: dict[int, list[float]]
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    lora: tuple[float, dict[str, str]] | None = None

    def add(self, field: str, priority: int, value: float) -> None:
        prio, total = self.sums.get(field, (priority, 0.0))
        if priority < prio:
            self.sums[field] = (priority, value)
        elif priority == prio:
            self.sums[field] = (prio, total + value)


def _wanted_lines(text: str) -> str:
    """The sample lines of the series routing reads; raises on a line that is no sample."""
    keep: list[str] = []
    for line in text.splitlines():
        if not line or line.startswith("#") or line.isspace():
            continue
        if _SAMPLE_LINE.match(line) is None:
            raise MetricsParseError(f"not Prometheus exposition format: {line[:80]!r}")
        end = min(i for i in (line.find("{"), line.find(" "), line.find("\t")) if i >= 0)
        if line[:end] in _WANTED:
            keep.append(line)
    return "\n".join(keep) + "\n"


def _samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    """The wanted samples; a NaN or infinite value is left out, as if the series were
    absent (it means nothing to add or compare, and ``int()`` of it raises)."""
    try:
        for family in text_string_to_metric_families(_wanted_lines(text)):
            for sample in family.samples:
                value = float(sample.value)
                if math.isfinite(value):
                    yield sample.name, sample.labels, value
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsParseError(str(exc)) from exc


def parse_vllm_metrics(text: str) -> EngineMetrics:
    """Parse Prometheus text from a vLLM (or enginesim) engine. Unknown series are ignored.

    Raises :class:`MetricsParseError` when the text is not valid exposition format.
    """
    acc = _Acc(sums={}, kv={})
    models: set[str] = set()
    for name, labels, value in _samples(text):  # only the vLLM series in _WANTED
        if "model_name" in labels:
            models.add(labels["model_name"])
        summed = _SUMMED.get(name)
        if summed is not None:
            acc.add(summed[0], summed[1], value)
        elif name in _KV_NAMES:
            acc.kv.setdefault(_KV_NAMES[name], []).append(value)
        elif name == "vllm:cache_config_info":
            acc.block_size = _int_label(labels.get("block_size")) or acc.block_size
            acc.num_gpu_blocks = _int_label(labels.get("num_gpu_blocks")) or acc.num_gpu_blocks
        elif name == "vllm:lora_requests_info" and (acc.lora is None or value > acc.lora[0]):
            acc.lora = (value, labels)
    kv_values = acc.kv[min(acc.kv)] if acc.kv else []
    lora_labels = acc.lora[1] if acc.lora is not None else {}
    sums = {field: total for field, (_, total) in acc.sums.items()}
    return EngineMetrics(
        running=int(sums.get("running", 0.0)),
        waiting=int(sums.get("waiting", 0.0)),
        kv_usage=sum(kv_values) / len(kv_values) if kv_values else 0.0,
        prefix_queries=sums.get("prefix_queries", 0.0),
        prefix_hits=sums.get("prefix_hits", 0.0),
        prompt_tokens=sums.get("prompt_tokens", 0.0),
        generation_tokens=sums.get("generation_tokens", 0.0),
        requests_finished=sums.get("requests_finished", 0.0),
        preemptions=sums.get("preemptions", 0.0),
        block_size=acc.block_size,
        num_gpu_blocks=acc.num_gpu_blocks,
        max_lora=_int_label(lora_labels.get("max_lora")),
        running_adapters=_split(lora_labels.get("running_lora_adapters", "")),
        waiting_adapters=_split(lora_labels.get("waiting_lora_adapters", "")),
        model_names=frozenset(models),
        ttft_sum_s=sums.get("ttft_sum_s", 0.0),
        ttft_count=sums.get("ttft_count", 0.0),
        itl_sum_s=sums.get("itl_sum_s", 0.0),
        itl_count=sums.get("itl_count", 0.0),
        has_kv_usage=bool(kv_values),
    )
