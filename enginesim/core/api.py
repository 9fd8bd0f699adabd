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
from typing import Literal, Protocol

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


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one request produced in one step."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: FinishReason | None = None
    # Set on the step that produced the first token.
    num_cached_tokens: int | None = None
    first_token: bool = False


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
    loaded_adapters: tuple[str, ...] = field(default_factory=tuple)


class EngineCoreAPI(Protocol):
    """What the server needs from the model. Implemented by ``enginesim.core.engine.EngineCore``."""

    def add_request(self, req: SimRequest) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self, now: float) -> StepResult: ...

    def stats(self) -> EngineStats: ...

    def load_adapter(self, name: str, *, size_bytes: int) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def take_events(self) -> Sequence[KVEvent]: ...
