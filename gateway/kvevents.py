"""KV-event consumers: each engine's ZMQ PUB socket -> the precise prefix index.

For every registered engine whose config names ``kv_events`` (e.g. ``tcp://10.0.0.5:5557``)
one task subscribes (pyzmq's asyncio sockets; bounded receive queue ``RCVHWM``), decodes
each multipart message with :func:`kvcache.decode_kv_event_message` and applies it through
a :class:`kvcache.EndpointFeed`, which re-hashes the reported token ids with the project's
one hash function (seeded by the engine's base model, learnt from its ``/v1/models``) into
the shared :class:`kvcache.PrefixIndex`. A reconcile loop starts consumers for new engines
and cancels those of removed ones (dropping their index entries). ZMQ reconnects by itself;
a bad message is logged and skipped; a crashed consumer is restarted by the loop.

Example::

    consumers = KVEventConsumers(endpoints, router)
    tg.start_soon(supervise, "kv-events", consumers.run)
"""

from __future__ import annotations

import logging

import anyio
import zmq
import zmq.asyncio

from gateway.endpoints import EndpointRegistry, EndpointState
from gateway.router import Router
from kvcache import EndpointFeed, KVEventDecodeError, decode_kv_event_message

log = logging.getLogger(__name__)

RECEIVE_HWM = 100_000


class KVEventConsumers:
    """One subscriber per engine with a ``kv_events`` endpoint; see the module docstring."""

    def __init__(
        self,
        endpoints: EndpointRegistry,
        router: Router,
        *,
        reconcile_s: float = 1.0,
        max_blocks_per_engine: int = 1_000_000,
    ) -> None:
        self._endpoints = endpoints
        self._router = router
        self._reconcile_s = reconcile_s
        self._max_blocks = max_blocks_per_engine
        self._running: dict[str, tuple[str, anyio.CancelScope]] = {}

    async def run(self) -> None:
        ctx = zmq.asyncio.Context()
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    self._reconcile(tg, ctx)
                    await anyio.sleep(self._reconcile_s)
        finally:
            for _, scope in self._running.values():
                scope.cancel()
            self._running.clear()
            ctx.destroy(linger=0)

    def _reconcile(self, tg: anyio.abc.TaskGroup, ctx: zmq.asyncio.Context) -> None:
        wanted = {s.id: s for s in self._endpoints if s.kv_events}
        for eid, (address, scope) in list(self._running.items()):
            state = wanted.get(eid)
            if state is None or state.kv_events != address or scope.cancel_called:
                scope.cancel()
                del self._running[eid]
                if state is None:
                    self._router.feeds.pop(eid, None)
                    self._router.index.drop_endpoint(eid)
        for eid, state in wanted.items():
            if eid not in self._running and state.kv_events:
                scope = anyio.CancelScope()
                self._running[eid] = (state.kv_events, scope)
                tg.start_soon(self._consume, state, state.kv_events, ctx, scope)

    async def _consume(
        self, state: EndpointState, address: str, ctx: zmq.asyncio.Context, scope: anyio.CancelScope
    ) -> None:
        with scope:
            try:
                await self._subscribe(state, address, ctx)
            except Exception:
                log.exception("KV-event consumer for %s crashed; restarting", state.id)
                await anyio.sleep(1.0)
            scope.cancel()  # the next reconcile starts a fresh one

    async def _subscribe(
        self, state: EndpointState, address: str, ctx: zmq.asyncio.Context
    ) -> None:
        model = state.base_model()
        while model is None:  # the health checker fills the model list
            await anyio.sleep(0.2)
            model = state.base_model()
        feed = EndpointFeed(state.id, self._router.index, model=model, max_blocks=self._max_blocks)
        self._router.feeds[state.id] = feed
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(address)
        log.info("subscribed to KV events of %s at %s (model %s)", state.id, address, model)
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    feed.apply(decode_kv_event_message(frames))
                except KVEventDecodeError as exc:
                    log.warning("bad KV event from %s: %s", state.id, exc)
        finally:
            sock.close(linger=0)
