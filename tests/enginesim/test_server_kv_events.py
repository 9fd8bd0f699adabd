"""KV events over ZMQ in vLLM's wire format, received by a plain zmq SUB socket."""

from __future__ import annotations

import time
from typing import Any

import httpx
import msgpack
import zmq

from enginesim.cluster import ClusterConfig
from enginesim.core.api import KVEvent
from enginesim.server.kv_events import encode_batch
from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, decode_kv_event_message
from tests.enginesim.server_harness import MODEL, running_cluster


def _receive_all(sub: zmq.Socket[bytes], *, until: float) -> list[list[bytes]]:
    msgs = []
    while time.monotonic() < until:
        if sub.poll(50):
            msgs.append(sub.recv_multipart())
        elif msgs:
            break
    return msgs


def test_block_stored_events_reach_a_sub_socket() -> None:
    cfg = ClusterConfig(engines=2, base_port=0, speed=50.0, model=MODEL, kv_events=True,
                        kv_events_base_port=0)  # fmt: skip
    ctx = zmq.Context()
    with running_cluster(cfg) as engines:
        endpoints = [e.kv_events_endpoint for e in engines]
        assert all(endpoints) and len(set(endpoints)) == 2
        sub = ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.LINGER, 0)
            assert endpoints[1] is not None
            sub.connect(endpoints[1])
            prompt = list(range(2000, 2300))  # 300 tokens: two full blocks of 128
            msgs: list[list[bytes]] = []
            deadline = time.monotonic() + 20.0
            with httpx.Client(base_url=engines[1].url, timeout=30.0) as http:
                while not msgs and time.monotonic() < deadline:  # ZMQ slow-joiner: retry
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
                    assert http.post("/v1/completions", json=body).status_code == 200
                    msgs = _receive_all(sub, until=time.monotonic() + 1.0)
        finally:
            sub.close()
            ctx.term()
    assert msgs, "no KV events received"
    seqs = []
    stored: list[list[Any]] = []
    for topic, seq, payload in msgs:
        assert topic.startswith(b"kv@127.0.0.1:") and topic.endswith(b"@" + MODEL.encode())
        assert len(seq) == 8
        seqs.append(int.from_bytes(seq, "big"))
        ts, events, dp_rank = msgpack.unpackb(payload)
        assert isinstance(ts, float) and dp_rank == 0
        for ev in events:
            assert ev[0] in {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
            if ev[0] == "BlockStored":
                stored.append(ev)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert stored
    tag, hashes, parent, token_ids, block_size, lora_id, medium, lora_name = stored[0]
    assert (tag, block_size, lora_id, medium, lora_name) == ("BlockStored", 128, None, "GPU", None)
    assert parent is None  # the first block of a prompt has no parent
    assert all(isinstance(h, int) for h in hashes)
    assert len(token_ids) == 128 * len(hashes)
    assert token_ids == prompt[: len(token_ids)]
    # The gateway's own decoder reads the same messages.
    decoded = [decode_kv_event_message(m) for m in msgs]
    first = next(e for b in decoded for e in b.events if isinstance(e, BlockStored))
    assert list(first.token_ids) == token_ids and first.block_size == 128


def test_every_event_kind_round_trips_through_the_gateway_decoder() -> None:
    events = [
        KVEvent(
            "BlockStored",
            block_hashes=(11, 12),
            parent_block_hash=10,
            token_ids=tuple(range(256)),
            block_size=128,
            lora_name="banana",
        ),  # fmt: skip
        KVEvent("BlockRemoved", block_hashes=(11,)),
        KVEvent("AllBlocksCleared"),
    ]
    payload = encode_batch(events, ts=123.5)
    assert msgpack.unpackb(payload) == [
        123.5,
        [
            ["BlockStored", [11, 12], 10, list(range(256)), 128, None, "GPU", "banana"],
            ["BlockRemoved", [11], "GPU"],
            ["AllBlocksCleared"],
        ],
        0,
    ]
    batch = decode_kv_event_message([b"kv@x", (7).to_bytes(8, "big"), payload])
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored) and stored.lora_name == "banana"
    assert stored.parent_block_hash == 10 and stored.block_hashes == (11, 12)
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == (11,)
    assert isinstance(cleared, AllBlocksCleared)
    assert batch.seq == 7
