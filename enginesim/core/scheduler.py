"""Continuous-batching scheduler, modelled on vLLM V1's ``Scheduler.schedule``.

Each step has a token budget (``max_num_batched_tokens``):

1. **Running requests first**, in admission order.  Each gets
   ``min(num_tokens - num_computed, budget)`` tokens: 1 for a decode, a chunk for a prefill
   still in progress (chunked prefill).  Blocks are allocated for the scheduled tokens; when
   the pool is empty the *newest* running request is preempted (V1 recompute policy: its
   blocks are freed, ``num_computed`` drops to 0, it goes to the *front* of the waiting queue
   and will be re-prefilled, prompt and generated tokens alike).  If the request itself was
   the newest, it is the one preempted and the loop stops.
2. **Then waiting requests**, FCFS, only when nothing was preempted this step, while budget
   is left and fewer than ``max_num_seqs`` run.  A request's prefix-cache hit is the longest
   run of cached full blocks among the first ``(num_tokens - 1) // block_size`` blocks (vLLM
   always recomputes at least the last token, so a fully cached prompt still recomputes its
   last block).  If its first chunk does not fit in free blocks, admission stops (FCFS, no
   overtaking).  A request whose adapter would make the batch use more than ``max_loras``
   distinct adapters is skipped (it keeps its place) and later requests may go ahead, as
   in vLLM.

Prefix-cache counters count a request once, at its first admission: ``queries`` += prompt
tokens, ``hits`` += cached tokens (re-admissions after preemption are not counted, as vLLM
files those under separate "preempted" stats).

**KV tier** (``tier`` given): after the local hit, the blocks the tier held
(``SimRequest.tier_blocks``) beyond it, up to the same ``(num_tokens - 1) // block_size``
limit, are loaded when :meth:`TierCost.worth_loading` says fetching beats recomputing
(else the decline is counted). Loaded tokens count as computed; their blocks are allocated
like new ones and enter the prefix cache when the step ends. vLLM's connector counters
follow ``Scheduler.schedule``: ``external queries`` += tokens beyond the local hit,
``external hits`` += tokens loaded, at first admission only. The load time is summed into
``Scheduled.tier_load_s`` (charged to the step: a synchronous load). Without a tier none of
this runs (one ``is None`` test per admission).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from enginesim.core.kv import KVCache
from enginesim.core.profile import EngineProfile
from enginesim.core.request import RequestState
from enginesim.core.tier import TierCost

__all__ = ["Scheduled", "Scheduler"]


@dataclass(slots=True)
class Scheduled:
    """The outcome of one scheduling pass: ``(request, new tokens)`` in batch order."""

    items: list[tuple[RequestState, int]] = field(default_factory=list)
    adapters: dict[str, int] = field(default_factory=dict)
    num_preempted: int = 0
    tier_load_s: float = 0.0
    # Async tier loads admitted this step: (request, fetch seconds); they hold their blocks,
    # compute nothing until the load is done (vLLM's WAITING_FOR_REMOTE_KVS).
    parked: list[tuple[RequestState, float]] = field(default_factory=list)


class Scheduler:
    """Queues, admission, block allocation and preemption.

    Example: ``s = Scheduler(profile, KVCache(64, 16)); s.add(state); s.schedule()``.
    """

    def __init__(
        self,
        profile: EngineProfile,
        kv: KVCache,
        tier: TierCost | None = None,
        *,
        async_load: bool = False,
    ) -> None:
        self.profile = profile
        self.kv = kv
        self.tier = tier
        self.async_load = async_load
        self.external_queries = 0
        self.external_hits = 0
        self.tier_declines = 0
        self.block_size = kv.block_size
        self.running: list[RequestState] = []
        self.waiting: deque[RequestState] = deque()
        self.requests: dict[str, RequestState] = {}
        self.running_adapters: Counter[str] = Counter()
        self.waiting_adapters: Counter[str] = Counter()
        # Adapters of requests in flight that were scheduled at least once (running, or
        # preempted back to waiting): all vLLM's ``lora_requests_info`` shows, since vLLM
        # learns a request's state from the events on its outputs and one still waiting for
        # its first schedule (e.g. for a LoRA slot) has none.
        self.scheduled_adapters: Counter[str] = Counter()
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.num_preemptions = 0

    # --- queue maintenance ---------------------------------------------------------------
    def add(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        self.waiting.append(state)
        self._count(self.waiting_adapters, state, +1)

    def remove(self, state: RequestState) -> None:
        """Take a request out of whichever queue holds it and free its blocks."""
        self.requests.pop(state.request_id, None)
        if state in self.running:
            self.running.remove(state)
            self._count(self.running_adapters, state, -1)
            self._count(self.scheduled_adapters, state, -1)
        elif state in self.waiting:
            self.waiting.remove(state)
            self._count(self.waiting_adapters, state, -1)
            if state.counted:  # preempted back to waiting
                self._count(self.scheduled_adapters, state, -1)
        self._release(state)

    def resume(self, state: RequestState) -> None:
        """An async tier load finished: the request runs from the next schedule on."""
        self.running.append(state)
        self._count(self.running_adapters, state, +1)

    def finish_running(self, finished: list[RequestState]) -> None:
        """Drop finished running requests in one O(running) pass and free their blocks."""
        done = {id(s) for s in finished}
        self.running = [s for s in self.running if id(s) not in done]
        for state in finished:
            self.requests.pop(state.request_id, None)
            self._count(self.running_adapters, state, -1)
            self._count(self.scheduled_adapters, state, -1)
            self._release(state)

    # --- scheduling ----------------------------------------------------------------------
    def schedule(self) -> Scheduled:
        """Pick this step's batch; allocates blocks, preempts and admits as needed."""
        out = Scheduled()
        budget = self.profile.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            state = self.running[i]
            n = min(state.num_tokens - state.num_computed, budget)
            if not self._grow_or_preempt(state, state.num_computed + n, out):
                break
            self._take(out, state, n)
            budget -= n
            i += 1
        if out.num_preempted == 0:
            budget = self._admit(out, budget)
        return out

    def _grow_or_preempt(self, state: RequestState, total_tokens: int, out: Scheduled) -> bool:
        bs = self.block_size
        need = -(-total_tokens // bs) - len(state.blocks)
        while need > 0:
            new = self.kv.allocate(need)
            if new is not None:
                state.blocks.extend(new)
                return True
            victim = self.running.pop()
            self._preempt(victim)
            out.num_preempted += 1
            if victim is state:
                return False
        return True

    def _admit(self, out: Scheduled, budget: int) -> int:
        bs = self.block_size
        max_loras = self.profile.max_loras
        skipped: list[RequestState] = []
        while self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs:
            state = self.waiting[0]
            adapter = state.req.adapter
            if adapter is not None and adapter not in out.adapters:
                if len(out.adapters) >= max_loras:
                    skipped.append(self.waiting.popleft())
                    continue
            max_blocks = (state.num_tokens - 1) // bs
            hit = self.kv.longest_hit(state.block_hashes, max_blocks)
            local_tokens = len(hit) * bs
            ext_tokens = declined = 0
            if self.tier is not None:
                ext_tokens, declined = self._tier_tokens(state, len(hit), max_blocks)
            hit_tokens = local_tokens + ext_tokens
            n = min(state.num_tokens - hit_tokens, budget)
            need = -(-(hit_tokens + n) // bs) - len(hit)
            if not self.kv.can_allocate(need, hit):
                break
            self.kv.touch(hit)
            new = self.kv.allocate(need)
            assert new is not None
            state.blocks = hit + new
            state.num_cached_blocks = len(hit)
            state.num_computed = hit_tokens
            parked = False
            if self.tier is not None:
                state.tier_written = max(state.tier_written, hit_tokens // bs)
                self.tier_declines += declined
                if ext_tokens and self.async_load:
                    out.parked.append((state, self.tier.fetch_s(ext_tokens)))
                    parked = True
                elif ext_tokens:
                    out.tier_load_s += self.tier.fetch_s(ext_tokens)
            if not state.counted:
                state.counted = True
                self._count(self.scheduled_adapters, state, +1)
                state.num_cached_tokens = hit_tokens
                state.num_external_tokens = ext_tokens
                self.prefix_queries += state.num_tokens
                self.prefix_hits += local_tokens
                if self.tier is not None:
                    self.external_queries += state.num_tokens - local_tokens
                    self.external_hits += ext_tokens
            self.waiting.popleft()
            self._count(self.waiting_adapters, state, -1)
            if parked:  # loads first; computes from a later step (Scheduler.resume)
                continue
            self.running.append(state)
            self._count(self.running_adapters, state, +1)
            self._take(out, state, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    # --- helpers -------------------------------------------------------------------------
    def _tier_tokens(
        self, state: RequestState, local_blocks: int, max_blocks: int
    ) -> tuple[int, int]:
        """(tokens to load from the tier beyond ``local_blocks``, 1 if the gate declined)."""
        assert self.tier is not None
        ext_blocks = min(state.req.tier_blocks, max_blocks) - local_blocks
        if ext_blocks <= 0:
            return 0, 0
        bs = self.block_size
        tokens = ext_blocks * bs
        if not self.tier.worth_loading(tokens, local_blocks * bs):
            return 0, 1
        return tokens, 0

    def _take(self, out: Scheduled, state: RequestState, n: int) -> None:
        out.items.append((state, n))
        adapter = state.req.adapter
        if adapter is not None and adapter not in out.adapters:
            out.adapters[adapter] = state.adapter_size

    def _preempt(self, state: RequestState) -> None:
        self._count(self.running_adapters, state, -1)
        self._release(state)
        state.num_computed = 0
        state.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(state)
        self._count(self.waiting_adapters, state, +1)

    def _release(self, state: RequestState) -> None:
        if state.blocks:
            self.kv.free(state.blocks)
        state.blocks = []
        state.num_cached_blocks = 0

    @staticmethod
    def _count(counter: Counter[str], state: RequestState, delta: int) -> None:
        adapter = state.req.adapter
        if adapter is not None:
            counter[adapter] += delta
            if counter[adapter] <= 0:
                del counter[adapter]
