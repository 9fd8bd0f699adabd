"""``EngineCore``: the pure, deterministic model of one vLLM engine (see ``core/api.py``).

One :meth:`EngineCore.step` = one forward pass: the scheduler picks the batch (allocating
KV blocks, preempting, admitting), the LoRA manager swaps adapters into GPU slots, the
timing model prices the batch, every request whose computed tokens caught up with its
known tokens samples one new token, full blocks enter the prefix cache, and finished
requests free their blocks.  No clock, no I/O: the server owns time.

Cost per step is O(batch + admitted + finished), never O(cache) or O(tokens in flight).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from enginesim.core.api import (
    EngineStats,
    FinishReason,
    KVEvent,
    RequestOutput,
    SimRequest,
    StepResult,
)
from enginesim.core.kv import KVCache
from enginesim.core.lora import LoraManager
from enginesim.core.profile import EngineProfile, load_profile
from enginesim.core.request import RequestState, TokenStream
from enginesim.core.scheduler import Scheduler
from enginesim.core.timing import BatchShape, step_time

__all__ = ["DEFAULT_EOS_PROBABILITY", "EngineCore"]

DEFAULT_EOS_PROBABILITY = 0.002
"""Chance per generated token of an EOS (mean natural length 500 tokens) when stops are set."""


class EngineCore:
    """Implements :class:`enginesim.core.api.EngineCoreAPI`.

    Example::

        core = EngineCore(load_profile("cpu-smollm2"), seed=1)
        core.add_request(SimRequest("r1", tuple(range(200)), max_tokens=4, arrival_time=0.0))
        while core.has_work():
            result = core.step(now)  # result.duration_s, result.outputs
    """

    def __init__(
        self,
        profile: EngineProfile | str | Path,
        *,
        seed: int = 0,
        eos_probability: float = DEFAULT_EOS_PROBABILITY,
        max_events: int = 100_000,
    ) -> None:
        if not isinstance(profile, EngineProfile):
            profile = load_profile(profile)
        if not 0.0 <= eos_probability <= 1.0:
            raise ValueError("eos_probability must be in [0, 1]")
        self.profile = profile
        self.seed = seed
        self.eos_probability = eos_probability
        self.kv = KVCache(profile.num_gpu_blocks, profile.block_size, max_events=max_events)
        self.lora = LoraManager(
            max_loras=profile.max_loras,
            max_cpu_loras=profile.max_cpu_loras,
            bytes_per_s=profile.lora_load_bytes_per_s,
            disk_bytes_per_s=profile.lora_disk_bytes_per_s,
            overhead_s=profile.lora_load_overhead_s,
        )
        self.scheduler = Scheduler(profile, self.kv)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_steps = 0

    # --- EngineCoreAPI -------------------------------------------------------------------
    def add_request(self, req: SimRequest) -> None:
        """Queue a request (``ValueError`` on a duplicate id, empty prompt or unknown adapter)."""
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if not req.prompt_token_ids:
            raise ValueError("empty prompt")
        if req.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        size = 0
        if req.adapter is not None:
            if req.adapter not in self.lora.registered:
                raise ValueError(f"adapter {req.adapter!r} is not loaded")
            size = self.lora.size_of(req.adapter)
        p = self.profile
        stream = TokenStream(
            seed=self.seed,
            request_id=req.request_id,
            lo=p.first_output_token_id,
            hi=p.vocab_size,
            stop_token_ids=req.stop_token_ids,
            eos_probability=0.0 if req.ignore_eos else self.eos_probability,
        )
        state = RequestState(req, stream=stream, adapter_size=size)
        state.update_hashes(p.block_size, p.model)
        self.scheduler.add(state)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its blocks now (cached ones stay, evictable); unknown: no-op."""
        state = self.scheduler.requests.get(request_id)
        if state is not None:
            self.scheduler.remove(state)

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def step(self, now: float) -> StepResult:
        """Run one forward step; ``now`` is unused by the model (kept for the contract)."""
        sched = self.scheduler.schedule()
        if not sched.items:
            dropped = () if sched.num_preempted else self._drop_unschedulable()
            return StepResult(duration_s=0.0, outputs=tuple(dropped))
        outputs: list[RequestOutput] = []
        self.num_steps += 1
        p = self.profile
        bs = p.block_size
        shape = BatchShape()
        finished: list[RequestState] = []
        first_scheduled: list[str] = []
        for state, n in sched.items:
            if not state.scheduled:
                state.scheduled = True
                first_scheduled.append(state.request_id)
            start = state.num_computed
            if n == 1 and state.output and start == state.num_tokens - 1:
                shape.add_decode(start + 1)
            else:
                shape.add_prefill(n, start)
            if state.req.adapter is not None:
                shape.lora_tokens += n
            state.num_computed = start + n
            self._cache_full_blocks(state, bs)
            if state.num_computed < state.num_tokens:
                continue  # a prefill chunk that did not reach the end yet
            out = self._sample(state)
            outputs.append(out)
            if out.finished is not None:
                finished.append(state)
        if finished:
            self.scheduler.finish_running(finished)
        swap_s = self.lora.activate(sched.adapters, sched.adapters) if sched.adapters else 0.0
        return StepResult(
            duration_s=step_time(p, shape) + swap_s,
            outputs=tuple(outputs),
            num_prefill_tokens=shape.prefill_tokens,
            num_decode_tokens=shape.num_decodes,
            first_scheduled_ids=tuple(first_scheduled),
        )

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_cache_usage=self.kv.usage,
            num_blocks=self.kv.num_blocks,
            block_size=self.kv.block_size,
            prefix_cache_queries=s.prefix_queries,
            prefix_cache_hits=s.prefix_hits,
            num_preemptions=s.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            max_loras=self.profile.max_loras,
            running_adapters=tuple(sorted(s.running_adapters)),
            waiting_adapters=tuple(sorted(s.waiting_adapters)),
            loaded_adapters=self.lora.registered,
        )

    def load_adapter(self, name: str, *, size_bytes: int) -> None:
        """Register an adapter (``ValueError`` if already loaded or LoRA is disabled)."""
        self.lora.load(name, size_bytes=size_bytes)

    def unload_adapter(self, name: str) -> None:
        """Unregister an adapter (``KeyError`` if unknown); requests already queued still run."""
        self.lora.unload(name)

    def take_events(self) -> Sequence[KVEvent]:
        return self.kv.take_events()

    # --- additions beyond the contract -----------------------------------------------------
    def reset_prefix_cache(self) -> bool:
        """vLLM ``/reset_prefix_cache``: clears cached hashes (emits ``AllBlocksCleared``).

        Refused (``False``) while any block is in use, as in vLLM.
        """
        return self.kv.reset()

    # --- internals -----------------------------------------------------------------------
    def _cache_full_blocks(self, state: RequestState, bs: int) -> None:
        full = state.num_computed // bs
        lo = state.num_cached_blocks
        if full <= lo:
            return
        self.kv.cache(
            state.blocks,
            state.block_hashes,
            start=lo,
            stop=full,
            tokens=state.tokens(lo * bs, full * bs),
            lora_name=state.req.adapter,
        )
        state.num_cached_blocks = full

    def _sample(self, state: RequestState) -> RequestOutput:
        tok = state.stream.next()
        first = not state.output
        state.output.append(tok)
        state.update_hashes(self.profile.block_size, self.profile.model)
        self.generation_tokens += 1
        if first:
            self.prompt_tokens += state.prompt_len
        reason: FinishReason | None = None
        if tok in state.stop_ids:
            reason = "stop"
        elif len(state.output) >= state.req.max_tokens or state.num_tokens >= (
            self.profile.max_model_len
        ):
            reason = "length"
        return RequestOutput(
            request_id=state.request_id,
            new_token_ids=(tok,),
            finished=reason,
            num_cached_tokens=state.num_cached_tokens if first else None,
            first_token=first,
        )

    def _drop_unschedulable(self) -> list[RequestOutput]:
        """With nothing running, a waiting head that still cannot start never will: abort it."""
        s = self.scheduler
        if s.running or not s.waiting:
            return []
        state = s.waiting[0]
        s.remove(state)
        return [RequestOutput(request_id=state.request_id, new_token_ids=(), finished="abort")]
