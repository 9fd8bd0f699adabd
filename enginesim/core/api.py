"""The contract between the pure engine model (``enginesim.core``) and the async server.

The server owns the clock. It calls :meth:`EngineCoreAPI.step` with the current *simulated*
time; the core runs one forward step (continuous batching: decodes first, then chunked
prefill up to the token budget) and returns how long that step takes in simulated seconds
plus what each request produced. Outputs become visible at ``now + duration``; the server
sleeps ``duration / speed`` wall seconds, then delivers them and calls ``step`` again.

Everything here is deterministic given the profile, the seed and the call sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from enginesim.core.profile import EngineProfile

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One generation request as the core sees it (one per choice when ``n`` > 1)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    arrival_time: float
    adapter: str | None = None
    ignore_eos: bool = False
    cache_salt: str | None = None
    # Token ids that end generation (EOS, tokenized stop strings are handled by the server).
    stop_token_ids: tuple[int, ...] = ()
    # Leading prompt blocks the shared KV tier held when the server looked the prompt up
    # (``--kv-tier``; 0 without a tier). The core loads those beyond its local prefix hit.
    tier_blocks: int = 0


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one request produced in one step."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: FinishReason | None = None
    # Set on the step that produced the first token: prompt tokens not computed (local prefix
    # hit + tier load) and, of those, the ones loaded from the tier.
    num_cached_tokens: int | None = None
    first_token: bool = False
    num_external_cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class KVEvent:
    """A KV-cache event in vLLM's vocabulary (published over ZMQ by the server)."""

    kind: Literal["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    block_hashes: tuple[int, ...] = ()
    parent_block_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    block_size: int = 0
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    """One forward step: its simulated duration and the outputs it made."""

    duration_s: float
    outputs: tuple[RequestOutput, ...] = ()
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # Requests scheduled for the first time in this step (vLLM's SCHEDULED event): the step's
    # start is their "scheduled" time for queue/prefill/inference metrics. Preemption
    # re-admissions are not repeated here.
    first_scheduled_ids: tuple[str, ...] = ()
    # Simulated seconds of this step spent loading KV blocks from the tier (in duration_s).
    tier_load_s: float = 0.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Gauges and counters the server exposes on ``/metrics``."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    block_size: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    max_loras: int
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    scheduled_adapters: tuple[str, ...] = ()
    """Adapters of in-flight requests scheduled at least once (running or preempted): the
    ones vLLM 0.32's ``vllm:lora_requests_info`` lists (under both of its labels)."""
    loaded_adapters: tuple[str, ...] = field(default_factory=tuple)
    # KV tier (vLLM's KV-connector counters; 0 without a tier): tokens looked up beyond the
    # local hit and tokens loaded, first admissions only; loads the break-even gate declined;
    # block writes dropped because the core's bounded write queue was full.
    external_prefix_cache_queries: int = 0
    external_prefix_cache_hits: int = 0
    tier_declines: int = 0
    tier_dropped_writes: int = 0


class EngineCoreAPI(Protocol):
    """What the server needs from the model. Implemented by ``enginesim.core.engine.EngineCore``."""

    @property
    def profile(self) -> EngineProfile: ...  # timing and memory (the LoRA disk read, ...)

    def add_request(self, req: SimRequest) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self, now: float) -> StepResult: ...

    def stats(self) -> EngineStats: ...

    def load_adapter(self, name: str, *, size_bytes: int) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def take_events(self) -> Sequence[KVEvent]: ...

    def take_tier_writes(self) -> Sequence[int]:
        """Hashes of full prompt blocks computed since the last call (empty without a tier)."""
        ...
