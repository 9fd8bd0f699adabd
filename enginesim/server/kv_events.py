"""vLLM KV-cache events over ZMQ PUB, in vLLM's wire format (vllm-contract.md §7).

Each publish is one multipart message ``[topic, seq, payload]``:

- ``topic``: ``b"kv@<host>:<port>@<model>"`` (the llm-d convention; subscribe to ``b""`` for all);
- ``seq``: 8-byte big-endian unsigned sequence number, starting at 0 and +1 per batch;
- ``payload``: msgpack of a ``KVEventBatch`` in msgspec's ``array_like`` encoding,
  ``[ts, [event, ...], data_parallel_rank]`` with ``ts`` wall-clock float seconds and rank 0.

Events use msgspec's array-like tagged-union encoding (tag first, then the fields in order):

- ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name]`` with int hashes (as with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), parent ``None``
  for a first block, ``lora_id`` ``None``, ``medium`` ``"GPU"``;
- ``["BlockRemoved", block_hashes, medium]``;
- ``["AllBlocksCleared"]``.

The socket binds (like vLLM's wildcard endpoint) and sends with ``NOBLOCK``: a slow subscriber
loses messages at the high-water mark instead of stalling the engine loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import zmq

from enginesim.core.api import KVEvent

__all__ = ["KVEventPublisher", "encode_batch", "encode_event"]

log = logging.getLogger(__name__)

MEDIUM = "GPU"


def encode_event(ev: KVEvent) -> list[Any]:
    """One event as msgspec's array-like tagged union."""
    if ev.kind == "BlockStored":
        return ["BlockStored", list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids),
                ev.block_size, None, MEDIUM, ev.lora_name]  # fmt: skip
    if ev.kind == "BlockRemoved":
        return ["BlockRemoved", list(ev.block_hashes), MEDIUM]
    return ["AllBlocksCleared"]


def encode_batch(events: Sequence[KVEvent], *, ts: float, dp_rank: int = 0) -> bytes:
    packed = msgpack.packb([ts, [encode_event(e) for e in events], dp_rank], use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


class KVEventPublisher:
    """ZMQ PUB socket of one engine.

    >>> pub = KVEventPublisher(ctx, "tcp://127.0.0.1:5557", topic="kv@127.0.0.1:8100@smollm2")
    >>> pub.publish(core.take_events()); pub.close()
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        *,
        topic: str,
        hwm: int = 100_000,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._sock = ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._topic = topic.encode()
        self._seq = 0
        self._clock = wall_clock
        self.dropped = 0

    @property
    def endpoint(self) -> str:
        """The bound endpoint (resolves a ``*`` port)."""
        last = self._sock.getsockopt(zmq.LAST_ENDPOINT)
        return last.decode() if isinstance(last, bytes) else str(last)

    def publish(self, events: Sequence[KVEvent]) -> None:
        if not events:
            return
        payload = encode_batch(events, ts=self._clock())
        seq = self._seq.to_bytes(8, "big")
        self._seq += 1
        try:
            self._sock.send_multipart([self._topic, seq, payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self._sock.close(linger=0)
