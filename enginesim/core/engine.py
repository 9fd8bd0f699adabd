"""``EngineCore``: the pure, deterministic model of one vLLM engine (see ``core/api.py``).

One :meth:`EngineCore.step` = one forward pass: the scheduler picks the batch (allocating
KV blocks, preempting, admitting), the LoRA manager swaps adapters into GPU slots, the
timing model prices the batch, every request whose computed tokens caught up with its
known tokens samples one new token, full blocks enter the prefix cache, and finished
requests free their blocks.  No clock, no I/O: the server owns time.

Cost per step is O(batch + admitted + finished), never O(cache) or O(tokens in flight).
"""

from __future__ import annotations

from collections import deque
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
from enginesim.core.tier import TierCost
from enginesim.core.timing import BatchShape, step_time

__all__ = ["DEFAULT_EOS_PROBABILITY", "DEFAULT_TEXT_PROBABILITY", "EngineCore"]

DEFAULT_EOS_PROBABILITY = 0.002
"""Chance per generated token of an EOS (mean natural length 500 tokens) when stops are set."""

DEFAULT_TEXT_PROBABILITY = 0.3
"""Chance per generated token of a text piece (punctuation, digit, newline) when the server
gave ``text_token_ids``: about the share of such tokens in English prose with numbers."""

MAX_IDLE_STEP_S = 0.02
"""Longest idle step while only async tier loads are in flight (new arrivals wait at most
this long for the engine loop to look again)."""

MAX_TIER_WRITES = 100_000
"""Bound of the undrained tier-write buffer (block hashes); the oldest are dropped."""


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
        text_token_ids: tuple[int, ...] = (),
        text_probability: float = DEFAULT_TEXT_PROBABILITY,
        hash_model: str | None = None,
        kv_tier: bool = False,
        kv_tier_async: bool = False,
    ) -> None:
        """``hash_model``: the model name seeding block hashes (default the profile's; the
        server passes the served name, which the tier's residency keys use). ``kv_tier``:
        model the shared KV tier (``SimRequest.tier_blocks``, :mod:`enginesim.core.tier`);
        ``kv_tier_async``: loads run beside the batch (the request waits ``fetch_s``, holding
        its blocks, while the engine keeps stepping) instead of inside the admitting step."""
        if not isinstance(profile, EngineProfile):
            profile = load_profile(profile)
        if not 0.0 <= eos_probability <= 1.0:
            raise ValueError("eos_probability must be in [0, 1]")
        self.profile = profile
        self.seed = seed
        self.eos_probability = eos_probability
        self.text_token_ids = text_token_ids
        self.text_probability = text_probability
        self.kv = KVCache(profile.num_gpu_blocks, profile.block_size, max_events=max_events)
        self.lora = LoraManager(
            max_loras=profile.max_loras,
            max_cpu_loras=profile.max_cpu_loras,
            bytes_per_s=profile.lora_load_bytes_per_s,
            disk_bytes_per_s=profile.lora_disk_bytes_per_s,
            overhead_s=profile.lora_load_overhead_s,
        )
        self.hash_model = hash_model or profile.model
        self.tier = TierCost.from_profile(profile) if kv_tier else None
        self.scheduler = Scheduler(profile, self.kv, self.tier, async_load=kv_tier_async)
        # Async tier loads in flight: (simulated time the load is done, request).
        self._loading: list[tuple[float, RequestState]] = []
        self._tier_writes: deque[int] = deque(maxlen=MAX_TIER_WRITES)
        self.dropped_tier_writes = 0
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
            text_ids=self.text_token_ids,
            text_probability=self.text_probability,
        )
        state = RequestState(req, stream=stream, adapter_size=size)
        state.update_hashes(p.block_size, self.hash_model)
        self.scheduler.add(state)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its blocks now (cached ones stay, evictable); unknown: no-op."""
        state = self.scheduler.requests.get(request_id)
        if state is not None:
            if self._loading:
                self._loading = [(t, s) for t, s in self._loading if s is not state]
            self.scheduler.remove(state)

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._loading)

    def step(self, now: float) -> StepResult:
        """Run one forward step at simulated time ``now`` (only async tier loads read it)."""
        if self._loading:
            self._resume_loaded(now)
        sched = self.scheduler.schedule()
        for state, fetch_s in sched.parked:
            self._loading.append((now + fetch_s, state))
        if not sched.items:
            if self._loading:  # only loads in flight: idle until the next one is done
                wait = min(t for t, _ in self._loading) - now
                return StepResult(duration_s=min(max(wait, 0.0), MAX_IDLE_STEP_S))
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
            duration_s=step_time(p, shape) + swap_s + sched.tier_load_s,
            outputs=tuple(outputs),
            num_prefill_tokens=shape.prefill_tokens,
            num_decode_tokens=shape.num_decodes,
            first_scheduled_ids=tuple(first_scheduled),
            tier_load_s=sched.tier_load_s,
        )

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting) + len(self._loading),
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
            scheduled_adapters=tuple(sorted(s.scheduled_adapters)),
            loaded_adapters=self.lora.registered,
            external_prefix_cache_queries=s.external_queries,
            external_prefix_cache_hits=s.external_hits,
            tier_declines=s.tier_declines,
            tier_dropped_writes=self.dropped_tier_writes,
        )

    def load_adapter(self, name: str, *, size_bytes: int) -> None:
        """Register an adapter (``ValueError`` if already loaded or LoRA is disabled)."""
        self.lora.load(name, size_bytes=size_bytes)

    def unload_adapter(self, name: str) -> None:
        """Unregister an adapter (``KeyError`` if unknown); requests already queued still run."""
        self.lora.unload(name)

    def take_events(self) -> Sequence[KVEvent]:
        return self.kv.take_events()

    def take_tier_writes(self) -> list[int]:
        """Hashes of full prompt blocks computed since the last call, for the tier (SET NX)."""
        if not self._tier_writes:
            return []
        out = list(self._tier_writes)
        self._tier_writes.clear()
        return out

    # --- additions beyond the contract -----------------------------------------------------
    def reset_prefix_cache(self) -> bool:
        """vLLM ``/reset_prefix_cache``: clears cached hashes (emits ``AllBlocksCleared``).

        Refused (``False``) while any block is in use, as in vLLM.
        """
        return self.kv.reset()

    # --- internals -----------------------------------------------------------------------
    def _resume_loaded(self, now: float) -> None:
        still: list[tuple[float, RequestState]] = []
        for t, state in self._loading:
            if t <= now:
                self.scheduler.resume(state)
            else:
                still.append((t, state))
        self._loading = still

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
        if self.tier is not None:
            self._queue_tier_writes(state, full)

    def _queue_tier_writes(self, state: RequestState, full: int) -> None:
        """Full *prompt* blocks computed here (not hit, not loaded) go to the tier."""
        stop = min(full, state.prompt_len // self.profile.block_size)
        if stop <= state.tier_written:
            return
        writes = self._tier_writes
        room = writes.maxlen or 0
        for h in state.block_hashes[state.tier_written : stop]:
            if len(writes) == room:
                self.dropped_tier_writes += 1
            writes.append(h)
        state.tier_written = stop

    def _sample(self, state: RequestState) -> RequestOutput:
        tok = state.stream.next()
        first = not state.output
        state.output.append(tok)
        state.update_hashes(self.profile.block_size, self.hash_model)
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
            num_external_cached_tokens=(
                state.num_external_tokens if first and self.tier is not None else None
            ),
        )

    def _drop_unschedulable(self) -> list[RequestOutput]:
        """With nothing running, a waiting head that still cannot start never will: abort it."""
        s = self.scheduler
        if s.running or not s.waiting:
            return []
        state = s.waiting[0]
        s.remove(state)
        return [RequestOutput(request_id=state.request_id, new_token_ids=(), finished="abort")]
