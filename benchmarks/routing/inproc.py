"""In-process router: our routing package driving the load client's target choice directly.

It wires the same pure pieces the gateway wires (:class:`~routing.state.EngineState` per
engine, :class:`~kvcache.index.PrefixIndex`, block hashing, a scraper of ``/metrics``, a
:class:`~routing.policy.Policy`), but inside the benchmark client, so a policy's *decision
quality* can be measured on the same engines as every other contender before (and apart
from) the gateway's proxy. Contenders named ``inproc:<policy>`` use it.

Prompts are hashed as byte blocks (64 bytes ~ 16 tokens, the no-tokenizer mode) over the
role-tagged message text, like the gateway does without a ``tokenizer.json``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import anyio
import httpx

from benchmarks.routing.loadgen import Routed
from benchmarks.routing.workloads import BenchRequest
from kvcache.hashing import hash_byte_blocks
from kvcache.index import PrefixIndex
from routing.fairness import VirtualTokenCounters
from routing.metrics_parser import MetricsParseError, parse_vllm_metrics
from routing.policy import Policy
from routing.state import EngineState, Ticket
from routing.types import RouteRequest

BLOCK_BYTES = 64
BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class _Hooks:
    state: EngineState
    ticket: Ticket
    vtc: VirtualTokenCounters
    user: str | None

    def first_token(self, ttft_s: float) -> None:
        self.state.first_token(self.ticket, ttft_s=ttft_s)

    def tokens(self, n: int, itl_s: float | None) -> None:
        self.state.tokens(self.ticket, n=n, itl_s=itl_s)

    def finish(self, ok: bool) -> None:
        if self.user is not None and not self.ticket.done:
            self.vtc.charge(
                self.user,
                input_tokens=self.ticket.prompt_tokens,
                output_tokens=self.ticket.output_tokens,
            )
            self.vtc.release(self.user)
        self.state.finish(self.ticket)


class InProcRouter:
    """A :class:`~benchmarks.routing.loadgen.Dispatcher` using a routing policy."""

    def __init__(self, policy: Policy, engines: dict[str, str], *, model: str) -> None:
        self.policy = policy
        self.model = model
        self.states = {eid: EngineState(eid, url) for eid, url in engines.items()}
        self.index = PrefixIndex(max_pairs=2_000_000, ttl_s=600.0)
        self.vtc = VirtualTokenCounters()
        self._seq = itertools.count()
        self.route_s: list[float] = []

    def route(self, req: BenchRequest) -> Routed:
        t0 = time.perf_counter()
        text = "\x00".join(f"{role}\x00{content}" for role, content in req.messages).encode()
        hashes = hash_byte_blocks(text, BLOCK_BYTES, model=self.model)
        matched = self.index.match(hashes)
        fairness = self.vtc.admit(req.user) if req.user else None
        rreq = RouteRequest(
            model=self.model,
            seq=next(self._seq),
            prompt_tokens=len(text) // BYTES_PER_TOKEN,
            max_tokens=req.max_tokens,
            block_hashes=tuple(hashes),
            block_tokens=BLOCK_BYTES // BYTES_PER_TOKEN,
            prefix_blocks=matched,
            session_key=req.session,
            user=req.user,
            stream=True,
            fairness=fairness,
        )
        decision = self.policy.choose(rreq, [s.snapshot() for s in self.states.values()])
        chosen = self.states[decision.ranked[0].id]
        ticket = chosen.begin(
            prompt_tokens=rreq.prompt_tokens,
            max_tokens=req.max_tokens,
            cached_tokens=matched.get(chosen.endpoint_id, 0) * rreq.block_tokens,
        )
        self.index.insert(chosen.endpoint_id, hashes)
        self.route_s.append(time.perf_counter() - t0)
        return Routed(
            base_url=chosen.url,
            hooks=_Hooks(state=chosen, ticket=ticket, vtc=self.vtc, user=req.user),
        )

    async def scrape_forever(self, client: httpx.AsyncClient, interval_s: float) -> None:
        """Scrape every engine's ``/metrics`` each ``interval_s`` until cancelled."""
        while True:
            for state in self.states.values():
                try:
                    resp = await client.get(f"{state.url}/metrics")
                    state.observe_metrics(parse_vllm_metrics(resp.text), at=time.monotonic())
                    state.set_health(resp.status_code == 200)
                except (httpx.HTTPError, MetricsParseError):
                    state.set_health(False)
            await anyio.sleep(interval_s)
