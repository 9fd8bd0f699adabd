"""In-process router: our routing package driving the load client's target choice directly.

It wires the same pure pieces the gateway wires (:class:`~routing.state.EngineState` per
engine, :class:`~kvcache.index.PrefixIndex`, block hashing, a scraper of ``/metrics``, a
:class:`~routing.policy.Policy`), but inside the benchmark client, so a policy's *decision
quality* can be measured on the same engines as every other contender before (and apart
from) the gateway's proxy. Contenders named ``inproc:<policy>`` use it.

Two hashing modes, like the gateway's: without a tokenizer, byte blocks (64 bytes ~ 16
tokens) over the role-tagged message text; with the engine's tokenizer and chat template
(``codec``), token blocks aligned to the engine's block size -- then, given the engines' KV
event endpoints, the index is also fed *precisely* from ``BlockStored``/``BlockRemoved``
events over ZMQ (:class:`~kvcache.precise.EndpointFeed`), and routed-only entries count only
as speculative for 2 s.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
import httpx

from benchmarks.routing.loadgen import Routed
from benchmarks.routing.workloads import BenchRequest
from kvcache.events import KVEventDecodeError, decode_kv_event_message
from kvcache.hashing import hash_byte_blocks, hash_token_blocks
from kvcache.index import PrefixIndex
from kvcache.precise import EndpointFeed
from routing.fairness import VirtualTokenCounters
from routing.metrics_parser import MetricsParseError, parse_vllm_metrics
from routing.policy import Policy
from routing.state import EngineState, Ticket
from routing.types import RouteRequest, is_placement

BLOCK_BYTES = 64
BYTES_PER_TOKEN = 4

log = logging.getLogger(__name__)


class Codec(Protocol):
    """The engine's tokenizer + chat template (enginesim's ``TextCodec`` fits)."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def chat_prompt(
        self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool
    ) -> str: ...


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

    def __init__(
        self,
        policy: Policy,
        engines: dict[str, str],
        *,
        model: str,
        codec: Codec | None = None,
        block_size: int = 16,
    ) -> None:
        self.policy = policy
        self.model = model
        self.codec = codec
        self.block_size = block_size
        self.states = {eid: EngineState(eid, url) for eid, url in engines.items()}
        self.index = PrefixIndex(max_pairs=2_000_000, ttl_s=600.0)
        self.vtc = VirtualTokenCounters()
        self._seq = itertools.count()
        self.route_s: list[float] = []
        self.feeds: dict[str, EndpointFeed] = {}

    def route(self, req: BenchRequest) -> Routed:
        t0 = time.perf_counter()
        if self.codec is not None:
            prompt = self.codec.chat_prompt(req.messages, add_generation_prompt=True)
            ids = self.codec.encode(prompt, add_special_tokens=False)
            hashes = hash_token_blocks(ids, self.block_size, model=self.model)
            prompt_tokens, block_tokens = len(ids), self.block_size
        else:
            text = "\x00".join(f"{role}\x00{content}" for role, content in req.messages).encode()
            hashes = hash_byte_blocks(text, BLOCK_BYTES, model=self.model)
            prompt_tokens, block_tokens = (
                len(text) // BYTES_PER_TOKEN,
                BLOCK_BYTES // BYTES_PER_TOKEN,
            )
        matched = self.index.match(hashes)
        fairness = self.vtc.admit(req.user) if req.user else None
        rreq = RouteRequest(
            model=self.model,
            seq=next(self._seq),
            prompt_tokens=prompt_tokens,
            max_tokens=req.max_tokens,
            block_hashes=tuple(hashes),
            block_tokens=block_tokens,
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
            seq=rreq.seq,
            placed=is_placement(rreq, (ep.id for ep in decision.ranked)),
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

    async def consume_kv_events(self, endpoint: str, zmq_url: str) -> None:
        """Feed the index from one engine's KV-event PUB socket until cancelled."""
        import zmq
        import zmq.asyncio

        feed = EndpointFeed(endpoint, self.index, model=self.model)
        self.feeds[endpoint] = feed
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(zmq_url)
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    feed.apply(decode_kv_event_message(frames))
                except KVEventDecodeError as exc:
                    log.warning("bad KV event from %s: %s", endpoint, exc)
        finally:
            sock.close(linger=0)
            ctx.term()
