"""Writes the Grafana dashboards in ``deploy/grafana/dashboards/`` from the tables below.

One place holds every panel (title, description, unit, PromQL), so the JSON stays uniform:
the datasource is the ``${datasource}`` variable, ``$model`` and ``$engine`` filter every
series that carries a model or an engine, ids are unique per dashboard, and a panel has a
unit and a description. Run ``python deploy/grafana/build.py`` after an edit and commit the
JSON too; tests/observability/test_dashboards.py fails when the two differ, and
tests/observability/test_prometheus.py evaluates every query against a real Prometheus.

Label conventions the queries rely on (docs/operations.md, Dashboards):

- gateway series (``switchyard_*``) name the engine ``endpoint`` (the engine id: the pod
  name with Kubernetes discovery, ``host:port`` or the configured id with static engines)
  and the served model ``model``;
- engine series (``vllm:*``) carry ``model_name``; the scrape configuration adds
  ``endpoint`` with the same engine id (vLLM's own ``engine`` label is the data-parallel
  rank, not the engine).

Usage::

    python deploy/grafana/build.py            # rewrite the JSON files and the docs table
    python deploy/grafana/build.py --check    # exit 1 when they are out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DASHBOARDS", "Dashboard", "Panel", "Target", "markdown", "render", "write"]

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
M = 'model=~"$model"'  # gateway series
E = 'endpoint=~"$engine"'  # gateway and engine series
VM = 'model_name=~"$model"'  # vLLM series
FIVE_XX = 'status=~"5.."'


@dataclass(frozen=True, slots=True)
class Target:
    """One PromQL query of a panel; ``legend`` is Grafana's legend format."""

    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class Panel:
    """A time series (or ``stat``) panel.

    >>> Panel("Requests", "What it shows", "reqps", (Target("sum(rate(x[1m]))"),))
    """

    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    max: float | None = None


@dataclass(frozen=True, slots=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[Panel, ...]], ...]
    tags: tuple[str, ...] = field(default=("switchyard",))


def q(expr: str, legend: str = "") -> Target:
    return Target(expr, legend)


def quantiles(metric: str, selector: str, by: str = "") -> tuple[Target, ...]:
    """p50, p90 and p99 of a histogram (summed over everything but ``by``)."""
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    series = f"{metric}_bucket{{{selector}}}" if selector else f"{metric}_bucket"
    return tuple(
        q(
            f"histogram_quantile({p}, sum by ({group}) (rate({series}[{RATE}])))",
            f"p{int(p * 100)}{suffix}",
        )
        for p in (0.5, 0.9, 0.99)
    )


def _req(extra: str = "") -> str:
    sel = f"{M}, {E}" + (f", {extra}" if extra else "")
    return f"switchyard_proxy_requests_total{{{sel}}}"


# The tables read better one panel per few lines than one argument per line.
# fmt: off
OVERVIEW = Dashboard(
    uid="switchyard-overview",
    title="Switchyard / Gateway overview",
    description="Traffic, errors, latency, TTFT/ITL and saturation of the gateway.",
    rows=(
        ("Traffic and errors", (
            Panel("Healthy engines", "Engines the gateway's health checker counts as healthy "
                  "(0 fires SwitchyardNoHealthyEngine).", "short",
                  (q(f"sum(switchyard_endpoint_healthy_ratio{{{E}}})", "healthy"),),
                  kind="stat", width=6, height=4),
            Panel("Requests/s", "Proxied requests per second (all statuses).", "reqps",
                  (q(f"sum(rate({_req()}[{RATE}]))", "requests/s"),), kind="stat",
                  width=6, height=4),
            Panel("5xx ratio", "Share of proxied requests answered 5xx (alert: "
                  "SwitchyardHigh5xxRatio).", "percentunit",
                  (q(f"(sum(rate({_req(FIVE_XX)}[{RATE}])) or vector(0)) / "
                     f"sum(rate({_req()}[{RATE}]))", "5xx"),),
                  kind="stat", width=6, height=4),
            Panel("In flight", "Requests the gateway is proxying now, all engines.", "short",
                  (q(f"sum(switchyard_proxy_in_flight_requests{{{E}}})", "in flight"),),
                  kind="stat", width=6, height=4),
            Panel("Requests/s by status", "Proxied requests per second by final HTTP status "
                  "(upstream 4xx pass through; 5xx after retries).", "reqps",
                  (q(f"sum by (status) (rate({_req()}[{RATE}]))", "{{status}}"),)),
            Panel("Requests/s by model", "Proxied requests per second by served model.",
                  "reqps", (q(f"sum by (model) (rate({_req()}[{RATE}]))", "{{model}}"),)),
            Panel("Upstream errors/s", "Failed attempts against an engine by error kind "
                  "(connect, timeout, status ...), before any retry.", "ops",
                  (q(f"sum by (kind) (rate(switchyard_proxy_upstream_errors_total{{{E}}}"
                     f"[{RATE}]))", "{{kind}}"),)),
            Panel("Retries/s", "Attempts moved to the next ranked engine before the first "
                  "byte, by model, and retries the retry budget refused.", "ops",
                  (q(f"sum by (model) (rate(switchyard_proxy_retries_total{{{M}}}[{RATE}]))",
                     "{{model}}"),
                   q(f"sum(rate(switchyard_proxy_refused_retries_total[{RATE}]))",
                     "refused by the budget"))),
            Panel("Tokens/s", "Prompt and completion tokens of answered requests (the "
                  "engines' usage, else the gateway's estimate).", "short",
                  (q(f"sum(rate(switchyard_proxy_prompt_tokens_total{{{M}, {E}}}[{RATE}]))",
                     "prompt"),
                   q(f"sum(rate(switchyard_proxy_completion_tokens_total{{{M}, {E}}}[{RATE}]))",
                     "completion"))),
            Panel("Stream errors/s", "Streams that ended with an error event after the "
                  "headers were sent, by engine.", "ops",
                  (q(f"sum by (endpoint) (rate(switchyard_proxy_stream_errors_total{{{E}}}"
                     f"[{RATE}]))", "{{endpoint}}"),)),
        )),
        ("Latency", (
            Panel("Request duration", "Gateway-side time from receiving a request to its "
                  "last byte: p50, p90, p99.", "s",
                  quantiles("switchyard_proxy_request_duration_seconds", f"{M}, {E}")),
            Panel("Time to first token", "Streams: time from receiving the request to the "
                  "engine's first SSE chunk, gateway side (alert: SwitchyardTTFTOverSLO).", "s",
                  quantiles("switchyard_proxy_time_to_first_token_seconds", f"{M}, {E}")),
            Panel("Inter-token latency", "Streams: mean time between output tokens of a "
                  "request, gateway side: p50, p90, p99 over requests.", "s",
                  quantiles("switchyard_proxy_inter_token_latency_seconds", f"{M}, {E}")),
            Panel("TTFT p90 by engine", "Gateway-side TTFT p90 per engine: one slow engine "
                  "stands out here.", "s",
                  (q(f"histogram_quantile(0.9, sum by (le, endpoint) (rate("
                     f"switchyard_proxy_time_to_first_token_seconds_bucket{{{M}, {E}}}"
                     f"[{RATE}])))", "{{endpoint}}"),)),
        )),
        ("Saturation", (
            Panel("In flight by engine", "Requests in flight per engine (the gateway's exact "
                  "count).", "short",
                  (q(f"sum by (endpoint) (switchyard_proxy_in_flight_requests{{{E}}})",
                     "{{endpoint}}"),)),
            Panel("Engine queue (gateway view)", "vllm:num_requests_waiting as the gateway "
                  "last scraped it, per engine.", "short",
                  (q(f"sum by (endpoint) (switchyard_endpoint_waiting_requests{{{E}}})",
                     "{{endpoint}}"),)),
            Panel("KV cache usage (gateway view)", "vllm:kv_cache_usage_perc as the gateway "
                  "last scraped it, per engine (alert: SwitchyardKVCacheNearFull).",
                  "percentunit",
                  (q(f"max by (endpoint) (switchyard_endpoint_kv_usage_ratio{{{E}}})",
                     "{{endpoint}}"),), max=1.0),
            Panel("Admission queue", "Requests waiting for room under the gateway's "
                  "concurrency caps (server.max_concurrent_requests, admission caps), and "
                  "those answered 503 by admission control per second, by reason.", "short",
                  (q("sum(switchyard_admission_queued_requests)", "queued"),
                   q(f"sum by (reason) (rate(switchyard_admission_shed_requests_total"
                     f"[{RATE}]))", "shed/s {{reason}}"))),
        )),
    ),
)

ROUTING = Dashboard(
    uid="switchyard-routing",
    title="Switchyard / Routing and prefix cache",
    description="Routing decisions per policy and outcome, prefix hits per engine, the "
    "prefix index.",
    rows=(
        ("Decisions", (
            Panel("Decisions/s by outcome", "Routing decisions by policy and prefix outcome "
                  "(hit, spill, cold, no_endpoint, saturated, ejected).", "ops",
                  (q(f"sum by (policy, outcome) (rate(switchyard_routing_decisions_total"
                     f"[{RATE}]))", "{{policy}} {{outcome}}"),)),
            Panel("Decisions/s by engine", "First-ranked engine of each decision: how the "
                  "policy spreads load.", "ops",
                  (q(f"sum by (endpoint) (rate(switchyard_routing_endpoint_decisions_total"
                     f"{{{E}}}[{RATE}]))", "{{endpoint}}"),)),
            Panel("LoRA adapter decisions/s", "Decisions for adapter requests: running (the "
                  "first-ranked engine reports the adapter running or waiting) or cold (it "
                  "must load it first).", "ops",
                  (q(f"sum by (outcome) (rate(switchyard_routing_adapter_decisions_total"
                     f"[{RATE}]))", "{{outcome}}"),)),
            Panel("Prefix hit ratio (gateway estimate)", "Share of decisions whose chosen "
                  "engine holds the longest known prefix (outcome hit / all with an engine).",
                  "percentunit",
                  (q(f'(sum by (policy) (rate(switchyard_routing_decisions_total{{outcome="hit"}}'
                     f"[{RATE}])) or sum by (policy) (rate(switchyard_routing_decisions_total"
                     f"[{RATE}])) * 0) / sum by (policy) (rate("
                     f'switchyard_routing_decisions_total{{outcome=~"hit|spill|cold"}}[{RATE}]))',
                     "{{policy}}"),), max=1.0),
            Panel("Prefix hit rate by engine (gateway estimate)", "Prompt blocks the "
                  "first-ranked engine is believed to hold / prompt blocks hashed, per engine "
                  "(the prefix index's estimate).", "percentunit",
                  (q(f"sum by (endpoint) (rate(switchyard_routing_prefix_hit_blocks_total"
                     f"{{{E}}}[{RATE}])) / sum by (endpoint) (rate("
                     f"switchyard_routing_prompt_blocks_total{{{E}}}[{RATE}]))",
                     "{{endpoint}}"),), max=1.0),
        )),
        ("Engines' prefix cache", (
            Panel("Prefix-cache hit rate by engine", "Engines' own prefix-cache hit rate "
                  "(vllm:prefix_cache_hits / queries, in tokens): the ground truth the "
                  "gateway's estimate aims at.", "percentunit",
                  (q(f"sum by (endpoint) (rate(vllm:prefix_cache_hits_total{{{VM}, {E}}}"
                     f"[{RATE}])) / sum by (endpoint) (rate(vllm:prefix_cache_queries_total"
                     f"{{{VM}, {E}}}[{RATE}]))", "{{endpoint}}"),), max=1.0),
            Panel("Cached prompt tokens/s by engine", "Prompt tokens served from the "
                  "engines' prefix cache per second.", "short",
                  (q(f"sum by (endpoint) (rate(vllm:prefix_cache_hits_total{{{VM}, {E}}}"
                     f"[{RATE}]))", "{{endpoint}}"),)),
        )),
        ("Prefix index", (
            Panel("Index pairs", "(block, engine) pairs in the gateway's prefix index and "
                  "its budget (routing.prefix.max_pairs).", "short",
                  (q("sum(switchyard_prefix_index_pairs)", "pairs"),
                   q("sum(switchyard_prefix_index_max_pairs)", "max"))),
            Panel("Index memory", "Estimated bytes held by the prefix index.", "bytes",
                  (q("sum(switchyard_prefix_index_bytes)", "bytes"),)),
            Panel("Index evictions/s", "Pairs dropped by reason (budget, ttl).", "ops",
                  (q(f"sum by (reason) (rate(switchyard_prefix_index_evictions_total[{RATE}]))",
                     "{{reason}}"),)),
            Panel("Index entries", "Distinct blocks in the prefix index.", "short",
                  (q("sum(switchyard_prefix_index_entries)", "entries"),)),
        )),
    ),
)

ENGINES = Dashboard(
    uid="switchyard-engines",
    title="Switchyard / Engines",
    description="The vLLM series per engine (scraped from each engine's /metrics) and the "
    "engine state the gateway sees.",
    rows=(
        ("Load", (
            Panel("Running requests", "vllm:num_requests_running per engine.", "short",
                  (q(f"sum by (endpoint) (vllm:num_requests_running{{{VM}, {E}}})",
                     "{{endpoint}}"),)),
            Panel("Waiting requests", "vllm:num_requests_waiting per engine: queued in the "
                  "engine's scheduler.", "short",
                  (q(f"sum by (endpoint) (vllm:num_requests_waiting{{{VM}, {E}}})",
                     "{{endpoint}}"),)),
            Panel("KV cache usage", "vllm:kv_cache_usage_perc per engine (1 = full: "
                  "preemptions follow).", "percentunit",
                  (q(f"max by (endpoint) (vllm:kv_cache_usage_perc{{{VM}, {E}}})",
                     "{{endpoint}}"),), max=1.0),
            Panel("Prefix-cache hit rate", "Prefix-cache hits / queries per engine (tokens).",
                  "percentunit",
                  (q(f"sum by (endpoint) (rate(vllm:prefix_cache_hits_total{{{VM}, {E}}}"
                     f"[{RATE}])) / sum by (endpoint) (rate(vllm:prefix_cache_queries_total"
                     f"{{{VM}, {E}}}[{RATE}]))", "{{endpoint}}"),), max=1.0),
        )),
        ("Throughput", (
            Panel("Prompt tokens/s", "Prefill throughput per engine "
                  "(vllm:prompt_tokens_total).", "short",
                  (q(f"sum by (endpoint) (rate(vllm:prompt_tokens_total{{{VM}, {E}}}[{RATE}]))",
                     "{{endpoint}}"),)),
            Panel("Generation tokens/s", "Decode throughput per engine "
                  "(vllm:generation_tokens_total).", "short",
                  (q(f"sum by (endpoint) (rate(vllm:generation_tokens_total{{{VM}, {E}}}"
                     f"[{RATE}]))", "{{endpoint}}"),)),
            Panel("Finished requests/s", "vllm:request_success_total by finish reason.",
                  "reqps",
                  (q(f"sum by (finished_reason) (rate(vllm:request_success_total{{{VM}, {E}}}"
                     f"[{RATE}]))", "{{finished_reason}}"),)),
            Panel("Preemptions/s", "Requests preempted for lack of KV cache, per engine.",
                  "ops",
                  (q(f"sum by (endpoint) (rate(vllm:num_preemptions_total{{{VM}, {E}}}"
                     f"[{RATE}]))", "{{endpoint}}"),)),
        )),
        ("Latency (engine side)", (
            Panel("Engine TTFT", "vllm:time_to_first_token_seconds: p50, p90, p99 (queue + "
                  "prefill, without the gateway).", "s",
                  quantiles("vllm:time_to_first_token_seconds", f"{VM}, {E}")),
            Panel("Engine queue time", "vllm:request_queue_time_seconds: p50, p90, p99.", "s",
                  quantiles("vllm:request_queue_time_seconds", f"{VM}, {E}")),
            Panel("Engine inter-token latency", "vllm:inter_token_latency_seconds: p50, p90, "
                  "p99 (decode steps, without the gateway).", "s",
                  quantiles("vllm:inter_token_latency_seconds", f"{VM}, {E}")),
            Panel("Engine end-to-end latency", "vllm:e2e_request_latency_seconds: p50, p90, "
                  "p99.", "s", quantiles("vllm:e2e_request_latency_seconds", f"{VM}, {E}")),
        )),
        ("Gateway view", (
            Panel("Healthy", "1 while the gateway's health checker counts the engine "
                  "healthy.", "short",
                  (q(f"max by (endpoint) (switchyard_endpoint_healthy_ratio{{{E}}})",
                     "{{endpoint}}"),)),
            Panel("Ejected or slow", "1 while outlier detection keeps the engine out of "
                  "routing (alert: SwitchyardEngineEjected); 1 while it is flagged slow.",
                  "short",
                  (q(f"max by (endpoint) (switchyard_endpoint_ejected_ratio{{{E}}})",
                     "ejected {{endpoint}}"),
                   q(f"max by (endpoint) (switchyard_endpoint_slow_ratio{{{E}}})",
                     "slow {{endpoint}}"))),
            Panel("Running (gateway view)", "vllm:num_requests_running as the gateway last "
                  "scraped it, and the gateway's own in-flight count, per engine.", "short",
                  (q(f"sum by (endpoint) (switchyard_endpoint_running_requests{{{E}}})",
                     "running {{endpoint}}"),
                   q(f"sum by (endpoint) (switchyard_proxy_in_flight_requests{{{E}}})",
                     "in flight {{endpoint}}"))),
            Panel("Engine scrapes seen", "How often the gateway's last good scrape of the "
                  "engine's /metrics changed over the window (its reading is a monotonic "
                  "clock, not wall time): 0 means the routing signals of the engine are "
                  "stale.", "short",
                  (q(f"max by (endpoint) (changes("
                     f"switchyard_endpoint_scraped_timestamp_seconds{{{E}}}[{RATE}]))",
                     "{{endpoint}}"),)),
            Panel("Ejections", "Outlier ejections per engine over the window.", "short",
                  (q(f"sum by (endpoint) (increase(switchyard_outlier_ejections_total{{{E}}}"
                     f"[{RATE}]))", "{{endpoint}}"),)),
            Panel("Health transitions/s", "Health state changes per engine.", "ops",
                  (q(f"sum by (endpoint, state) (rate("
                     f"switchyard_endpoint_health_transitions_total{{{E}}}[{RATE}]))",
                     "{{endpoint}} {{state}}"),)),
        )),
    ),
)

LIMITS = Dashboard(
    uid="switchyard-limits",
    title="Switchyard / Tenants and limits",
    description="Rate-limit decisions, authentication, admission control and the Redis link "
    "the shared limits use. Labels are bounded: scope (key, user, tenant), never a key or "
    "user id.",
    rows=(
        ("Rate limits", (
            Panel("Decisions/s", "Rate-limit decisions by scope (key, user, tenant), kind "
                  "(requests, tokens) and outcome.", "ops",
                  (q(f"sum by (scope, kind, outcome) (rate("
                     f"switchyard_ratelimit_decisions_total[{RATE}]))",
                     "{{scope}} {{kind}} {{outcome}}"),)),
            Panel("Denied ratio by scope", "Share of rate-limit checks denied (429), per "
                  "scope.", "percentunit",
                  (q(f"(sum by (scope) (rate(switchyard_ratelimit_decisions_total"
                     f'{{outcome="denied"}}[{RATE}])) or sum by (scope) (rate('
                     f"switchyard_ratelimit_decisions_total[{RATE}])) * 0) / sum by (scope) "
                     f"(rate(switchyard_ratelimit_decisions_total[{RATE}]))", "{{scope}}"),),
                  max=1.0),
            Panel("Usage settlements/s", "Token usage settled after a response: sent to "
                  "Redis, kept local, or dropped.", "ops",
                  (q(f"sum by (outcome) (rate(switchyard_ratelimit_settlements_total"
                     f"[{RATE}]))", "{{outcome}}"),)),
            Panel("Local decisions/s", "Decisions taken on the gateway's local state (no "
                  "Redis round trip).", "ops",
                  (q(f"sum(rate(switchyard_ratelimit_local_decisions_total[{RATE}]))",
                     "local"),)),
        )),
        ("Keys and admission", (
            Panel("API keys", "Keys the gateway accepts, by source (config, admin API).",
                  "short", (q("sum by (source) (switchyard_auth_keys)", "{{source}}"),)),
            Panel("Auth failures/s", "Requests refused 401 (missing or unknown key).", "ops",
                  (q(f"sum(rate(switchyard_auth_failures_total[{RATE}]))", "401/s"),)),
            Panel("Admission wait", "Time requests that found no room waited in the "
                  "admission queue: p50, p90, p99.", "s",
                  quantiles("switchyard_admission_wait_seconds", "")),
            Panel("Admission queue depth", "Requests waiting for room under the concurrency "
                  "caps.", "short", (q("sum(switchyard_admission_queued_requests)", "queued"),)),
        )),
        ("Redis", (
            Panel("Redis up", "1 while Redis answers; 0: limits fall back to local fair "
                  "shares (alert: SwitchyardRedisDegraded).", "short",
                  (q("min(switchyard_redis_healthy_ratio)", "up"),), kind="stat", width=6,
                  height=4),
            Panel("Redis errors/s", "Failed Redis calls by operation.", "ops",
                  (q(f"sum by (op) (rate(switchyard_redis_errors_total[{RATE}]))", "{{op}}"),),
                  width=12, height=4),
            Panel("Redis link changes", "Times the Redis link went down or came back over "
                  "the window.", "short",
                  (q(f"sum(increase(switchyard_redis_transitions_total[{RATE}]))", "changes"),),
                  width=6, height=4),
        )),
        ("Shared state across replicas", (
            Panel("Replicas sharing state", "Gateway replicas seen in Redis (in-flight "
                  "counts, prefix index, fairness are exchanged between them).", "short",
                  (q("max(switchyard_shared_state_replicas)", "replicas"),)),
            Panel("Shared-state sync", "Duration of one exchange with Redis (p50, p90, p99); "
                  "replicas see each other's routing this late.", "s",
                  quantiles("switchyard_shared_state_sync_seconds", "")),
            Panel("Sync errors/s", "Failed shared-state exchanges (each replica then routes "
                  "on its local view).", "ops",
                  (q(f"sum(rate(switchyard_shared_state_sync_errors_total[{RATE}]))",
                     "errors"),)),
            Panel("Prefix records/s", "Prefix-index records sent to and received from the "
                  "other replicas.", "ops",
                  (q(f"sum by (direction) (rate(switchyard_shared_state_prefix_records_total"
                     f"[{RATE}]))", "{{direction}}"),)),
            Panel("Limit batching", "Rate-limit checks per Redis round trip (batched "
                  "across concurrent requests), and rules enforced locally.", "short",
                  (q(f"sum(rate(switchyard_ratelimit_batch_items_total[{RATE}])) / "
                     f"sum(rate(switchyard_ratelimit_batches_total[{RATE}]))",
                     "checks per batch"),
                   q("max(switchyard_ratelimit_local_rules)", "local rules"))),
            Panel("Key reloads", "Reloads of the API keys created through the admin API "
                  "(every redis.keys_refresh_s) over the window.", "short",
                  (q(f"sum(increase(switchyard_auth_key_reloads_total[{RATE}]))", "reloads"),)),
        )),
    ),
)

AUTOSCALING = Dashboard(
    uid="switchyard-autoscaling",
    title="Switchyard / Autoscaling",
    description="The autoscaler (embedded in the gateway or standalone) and the Kubernetes "
    "discovery feeding it.",
    rows=(
        ("Replicas", (
            Panel("Replicas", "Desired (after limits), recommended (the policy's number), "
                  "current (spec.replicas) and ready pods of the scale target.", "short",
                  (q("max(switchyard_autoscaler_desired_replicas)", "desired"),
                   q("max(switchyard_autoscaler_recommended_replicas)", "recommended"),
                   q("max(switchyard_autoscaler_current_replicas)", "current"),
                   q("max(switchyard_autoscaler_ready_replicas)", "ready"))),
            Panel("Decisions/s by reason", "Policy decisions by policy and reason.", "ops",
                  (q(f"sum by (policy, reason) (rate(switchyard_autoscaler_decisions_total"
                     f"[{RATE}]))", "{{policy}} {{reason}}"),)),
            Panel("Leader, panic, holding", "1 while this instance holds the lease; 1 while "
                  "the policy is in panic mode; 1 while the loop holds after an error.", "short",
                  (q("max(switchyard_autoscaler_leader_ratio)", "leader"),
                   q("max(switchyard_autoscaler_panic_ratio)", "panic"),
                   q("max(switchyard_autoscaler_holding_ratio)", "holding"))),
            Panel("Errors/s by kind", "Failed ticks and calls: api (Kubernetes), metrics "
                  "(stale or failed scrapes), policy (a bug).", "ops",
                  (q(f"sum by (kind) (rate(switchyard_autoscaler_errors_total[{RATE}]))",
                     "{{kind}}"),)),
            Panel("Limited decisions/s", "Decisions the actuator's limits changed, by limit "
                  "(max: stuck at max_replicas, alert SwitchyardAutoscalerAtMax).", "ops",
                  (q(f"sum by (limit) (rate(switchyard_autoscaler_limited_decisions_total"
                     f"[{RATE}]))", "{{limit}}"),)),
            Panel("Scale patches/s", "Scale subresource patches applied.", "ops",
                  (q(f"sum(rate(switchyard_autoscaler_scale_patches_total[{RATE}]))",
                     "patches"),)),
        )),
        ("Signals", (
            Panel("Arrivals", "Requests/s and prompt tokens/s the autoscaler saw arrive.",
                  "short",
                  (q("max(switchyard_autoscaler_arrivals_per_second)", "requests/s"),
                   q("max(switchyard_autoscaler_prompt_tokens_per_second)",
                     "prompt tokens/s"))),
            Panel("Load on the target", "In-flight requests, engine-waiting requests and "
                  "queued prompt tokens over the target's engines.", "short",
                  (q("max(switchyard_autoscaler_in_flight_requests)", "in flight"),
                   q("max(switchyard_autoscaler_waiting_requests)", "waiting"),
                   q("max(switchyard_autoscaler_queued_prompt_tokens)",
                     "queued prompt tokens"))),
        )),
        ("Discovery", (
            Panel("Discovered engines", "Engines registered from Kubernetes pods.", "short",
                  (q("max(switchyard_discovery_endpoints)", "engines"),)),
            Panel("Pod events/s", "Pod watch events by type.", "ops",
                  (q(f"sum by (type) (rate(switchyard_discovery_events_total[{RATE}]))",
                     "{{type}}"),)),
            Panel("Relists and errors", "Pod lists after the first, by reason, and failed "
                  "API calls (total over the range).", "short",
                  (q(f"sum by (reason) (increase(switchyard_discovery_relists_total[{RATE}]))",
                     "relist {{reason}}"),
                   q(f"sum(increase(switchyard_discovery_errors_total[{RATE}]))", "errors"))),
        )),
    ),
)

KV_TIER = Dashboard(
    uid="switchyard-kv-tier",
    title="Switchyard / KV tier",
    description="The gateway's prefix index (size, sources, hit estimates), its lookups of "
    "the shared KV tier for tier-aware routing (kv_tier.enabled, docs/kvtier.md) and the "
    "engines' own and external (connector) prefix-cache counters.",
    rows=(
        ("Prefix index", (
            Panel("Index fill", "Pairs in the prefix index over its budget "
                  "(routing.prefix.max_pairs); near 1 the index evicts by budget.",
                  "percentunit",
                  (q("sum(switchyard_prefix_index_pairs) / "
                     "sum(switchyard_prefix_index_max_pairs)", "fill"),), max=1.0),
            Panel("Pairs by source", "Pairs learned from routing (approximate) and from "
                  "engines' KV events (precise).", "short",
                  (q("sum by (source) (switchyard_prefix_index_source_pairs)", "{{source}}"),)),
            Panel("Engines with KV events", "Engines whose KV events feed the precise "
                  "index.", "short",
                  (q("max(switchyard_prefix_index_precise_endpoints)", "engines"),)),
            Panel("Index memory", "Estimated bytes held by the prefix index.", "bytes",
                  (q("sum(switchyard_prefix_index_bytes)", "bytes"),)),
            Panel("KV events: blocks/s", "Blocks the engines report stored and removed "
                  "through their KV events (engines configured with kv_events).", "ops",
                  (q(f"sum by (endpoint, event) (rate(switchyard_kv_events_blocks_total{{{E}}}"
                     f"[{RATE}]))", "{{endpoint}} {{event}}"),)),
            Panel("KV events: problems", "Lost KV-event batches (seq_gap) and blocks with an "
                  "unknown parent (unchained) over the window: the precise index may be "
                  "missing blocks.", "short",
                  (q(f"sum by (endpoint, kind) (increase(switchyard_kv_events_problems_total"
                     f"{{{E}}}[{RATE}]))", "{{endpoint}} {{kind}}"),)),
        )),
        ("Tier-aware routing", (
            Panel("Tier lookups/s by outcome", "Requests whose residency in the shared KV "
                  "tier the gateway looked up (kv_tier.enabled), by how the lookup was "
                  "answered: cache and redis are working lookups; error, breaker (Redis "
                  "failed, not asked for kv_tier.retry_s) and timeout "
                  "(kv_tier.lookup_timeout_s) route as without a tier; skipped: byte-mode "
                  "blocks (no routing.prefix.tokenizer), never an engine's key.", "reqps",
                  (q(f"sum by (outcome) (rate(switchyard_kv_tier_lookup_requests_total"
                     f"[{RATE}]))", "{{outcome}}"),)),
            Panel("Prompt blocks the tier holds", "Share of the looked-up prompt blocks "
                  "whose residency keys the tier holds (leading blocks, the tier_blocks "
                  "routing used): zero while lookups work means the engines write no "
                  "residency keys the gateway can match (model name, block size, tokenizer).",
                  "percentunit",
                  (q(f"sum(rate(switchyard_kv_tier_held_blocks_total[{RATE}])) / "
                     f"sum(rate(switchyard_kv_tier_prompt_blocks_total[{RATE}]))",
                     "held"),), max=1.0),
        )),
        ("Hits", (
            Panel("Gateway hit estimate", "Share of prompt blocks the first-ranked engine is "
                  "believed to hold (the prefix index's estimate), all engines.", "percentunit",
                  (q(f"sum(rate(switchyard_routing_prefix_hit_blocks_total{{{E}}}[{RATE}])) / "
                     f"sum(rate(switchyard_routing_prompt_blocks_total{{{E}}}[{RATE}]))",
                     "estimate"),), max=1.0),
            Panel("Engine cached prompt tokens", "Share of prompt tokens the engines served "
                  "from their own prefix cache.", "percentunit",
                  (q(f"sum(rate(vllm:prefix_cache_hits_total{{{VM}, {E}}}[{RATE}])) / "
                     f"sum(rate(vllm:prefix_cache_queries_total{{{VM}, {E}}}[{RATE}]))",
                     "local"),), max=1.0),
            Panel("External KV hits", "Prompt tokens found by the engines' KV connector "
                  "(vllm:external_prefix_cache_hits / queries); zero until a shared tier "
                  "is connected.", "short",
                  (q(f"sum(rate(vllm:external_prefix_cache_hits_total{{{VM}, {E}}}[{RATE}]))",
                     "hits"),
                   q(f"sum(rate(vllm:external_prefix_cache_queries_total{{{VM}, {E}}}"
                     f"[{RATE}]))", "queries"))),
        )),
    ),
)

_LORA_OPS = "switchyard_lora_operations_total"
_LORA_LOADS_FAILED = f'{_LORA_OPS}{{op="load", outcome!="ok"}}'

LORA = Dashboard(
    uid="switchyard-lora",
    title="Switchyard / LoRA adapters",
    description="High-density LoRA (docs/lora.md): the adapter registry, what each engine "
    "holds, loads and unloads, on-demand waits, the placement controller and adapter "
    "routing. Gateway series; pick adapters with $model (an adapter is its own model).",
    rows=(
        ("Registry and residency", (
            Panel("Registered adapters", "Adapters in the gateway's registry by origin "
                  "(config, admin API, ConfigMap); max over gateway replicas (admin entries "
                  "live on the replica that got the call).", "short",
                  (q("max by (origin) (switchyard_lora_adapters)", "{{origin}}"),)),
            Panel("Loaded adapters per engine", "Adapters each engine lists in /v1/models "
                  "(with a parent), as the gateway last saw them; at most the engine's "
                  "max_loras when placement keeps up.", "short",
                  (q(f"max by (endpoint) (switchyard_lora_loaded_adapters{{{E}}})",
                     "{{endpoint}}"),)),
            Panel("Requests/s by adapter", "Proxied requests per second by model: choose "
                  "adapters in $model (an adapter an engine lists is its own model value).",
                  "reqps",
                  (q(f"sum by (model) (rate({_req()}[{RATE}]))", "{{model}}"),)),
            Panel("Adapter routing decisions/s", "Routing decisions for adapter requests: "
                  "running (the first-ranked engine reports the adapter running or waiting) "
                  "or cold (it does not: the adapter sits idle there or was just "
                  "loaded).", "ops",
                  (q(f"sum by (outcome) (rate(switchyard_routing_adapter_decisions_total"
                     f"[{RATE}]))", "{{outcome}}"),)),
        )),
        ("Loads and unloads", (
            Panel("Loads and unloads/s", "Load/unload calls made to engines by reason "
                  "(on_demand, demand, spread, make_room, idle, reconcile, admin) and outcome "
                  "(ok, rejected: the engine's 4xx, failed: 5xx or unreachable, timeout).",
                  "ops",
                  (q(f"sum by (op, reason, outcome) (rate({_LORA_OPS}[{RATE}]))",
                     "{{op}} {{reason}} {{outcome}}"),)),
            Panel("Failed load ratio", "Loads not ok / all loads (alert: "
                  "SwitchyardLoraLoadsFailing).", "percentunit",
                  (q(f"(sum(rate({_LORA_LOADS_FAILED}[{RATE}])) or vector(0)) / "
                     f'sum(rate({_LORA_OPS}{{op="load"}}[{RATE}]))', "failed"),), max=1.0),
            Panel("Load latency", "Successful /v1/load_lora_adapter calls, the engine's "
                  "answer time (it reads the weights from disk): p50, p90, p99.", "s",
                  quantiles("switchyard_lora_load_duration_seconds", "")),
            Panel("Loads suppressed by backoff/s", "Loads not made because every engine "
                  "that could load the adapter refused or failed its last load and backs off "
                  "(5 s doubling to 5 min; docs/lora.md): demand = per placement round, "
                  "on_demand = requests answered with the remembered error. Steady non-zero: "
                  "a broken adapter still in demand (GET /admin/adapters: last_error).", "ops",
                  (q(f"sum by (reason) (rate(switchyard_lora_suppressed_operations_total"
                     f"[{RATE}]))", "{{reason}}"),)),
        )),
        ("On-demand loads", (
            Panel("On-demand waits/s by outcome", "Requests that waited for an adapter "
                  "load, by how the wait ended (loaded; rejected/failed: the load failed; "
                  "no_slot: 503 at once, every slot busy; timeout: lora.load_timeout_s; "
                  "disconnect; shutdown).", "reqps",
                  (q(f"sum by (outcome) (rate(switchyard_lora_on_demand_requests_total"
                     f"[{RATE}]))", "{{outcome}}"),)),
            Panel("On-demand wait", "Time requests waited for an on-demand load, however "
                  "it ended: p50, p90, p99 (added to their TTFT).", "s",
                  quantiles("switchyard_lora_on_demand_wait_seconds", "")),
        )),
        ("Placement", (
            Panel("Placement decisions/s", "Actions the placement controller and on-demand "
                  "loads decided, by op and reason (spread: a hot adapter on one more "
                  "engine; idle: unloaded after lora.placement.idle_s).", "ops",
                  (q(f"sum by (op, reason) (rate(switchyard_lora_placement_decisions_total"
                     f"[{RATE}]))", "{{op}} {{reason}}"),)),
            Panel("Reconciled adapters", "Adapters an engine listed or dropped without this "
                  "gateway's load or unload (loaded by hand, engine restarts), over the "
                  "window.", "short",
                  (q(f"sum by (change) (increase(switchyard_lora_reconciled_adapters_total"
                     f"[{RATE}]))", "{{change}}"),)),
        )),
    ),
)
# fmt: on

DASHBOARDS = (OVERVIEW, ROUTING, ENGINES, LIMITS, AUTOSCALING, KV_TIER, LORA)


def _variables() -> list[dict[str, Any]]:
    def label_var(name: str, label: str, query: str) -> dict[str, Any]:
        definition = f"label_values({query}, {label})"
        return {
            "name": name,
            "label": name.capitalize(),
            "type": "query",
            "datasource": DATASOURCE,
            "definition": definition,
            # a string: every Grafana version reads it (newer ones migrate it on load)
            "query": definition,
            "refresh": 2,
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "regex": "",
            "sort": 1,
            "hide": 0,
        }

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "options": [],
            "regex": "",
            "refresh": 1,
            "hide": 0,
        },
        label_var("model", "model", "switchyard_proxy_requests_total"),
        label_var("engine", "endpoint", "switchyard_endpoint_healthy_ratio"),
    ]


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "min": 0}
    if panel.max is not None:
        defaults["max"] = panel.max
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if panel.kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": t.expr,
                "legendFormat": t.legend,
                "range": True,
            }
            for i, t in enumerate(panel.targets)
        ],
    }
    return out


def render(dash: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (rows are row panels; panels flow 24 wide)."""
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, row in dash.rows:
        panels.append({
            "id": pid, "type": "row", "title": row_title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": [],
        })  # fmt: skip
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for panel in row:
            if x + panel.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel(panel, pid, x, y))
            pid, x, row_h = pid + 1, x + panel.width, max(row_h, panel.height)
        y += row_h
    return {
        "uid": dash.uid,
        "title": dash.title,
        "description": dash.description,
        "tags": list(dash.tags),
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": _variables()},
        "panels": panels,
    }


def dump(dash: Dashboard) -> str:
    return json.dumps(render(dash), indent=2, sort_keys=True) + "\n"


def write(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for dash in DASHBOARDS:
        path = out / f"{dash.uid.removeprefix('switchyard-')}.json"
        path.write_text(dump(dash))
        paths.append(path)
    return paths


DOC = OUT.parents[2] / "docs" / "operations.md"
DOC_BEGIN = "<!-- dashboards table: written by deploy/grafana/build.py -->"
DOC_END = "<!-- end of dashboards table -->"


def markdown() -> str:
    """The panel table of docs/operations.md (Dashboards): one row per query."""
    lines = ["| dashboard | panel | unit | query |", "|---|---|---|---|"]
    for dash in DASHBOARDS:
        for _, row in dash.rows:
            for panel in row:
                for t in panel.targets:
                    expr = t.expr.replace("|", "\\|")
                    lines.append(f"| {dash.title.removeprefix('Switchyard / ')} | {panel.title}"
                                 f" | {panel.unit} | `{expr}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def with_table(doc: str) -> str:
    """``doc`` with the text between the two markers replaced by :func:`markdown`."""
    head, sep, rest = doc.partition(DOC_BEGIN)
    _, sep2, tail = rest.partition(DOC_END)
    if not sep or not sep2:
        raise ValueError(f"{DOC} lacks the dashboards table markers")
    return f"{head}{DOC_BEGIN}\n{markdown()}{DOC_END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the JSON is stale")
    args = parser.parse_args()
    if args.check:
        stale = [
            d.uid for d in DASHBOARDS
            if not (OUT / f"{d.uid.removeprefix('switchyard-')}.json").is_file()
            or (OUT / f"{d.uid.removeprefix('switchyard-')}.json").read_text() != dump(d)
        ]  # fmt: skip
        if DOC.read_text() != with_table(DOC.read_text()):
            stale.append(str(DOC))
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    for path in write():
        print(path)
    DOC.write_text(with_table(DOC.read_text()))
    print(DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
