from __future__ import annotations

from typing import Any

import msgpack
import pytest

from kvcache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventDecodeError,
    decode_kv_event_message,
    decode_kv_event_payload,
)


def frames(payload: Any, seq: int = 7, topic: bytes = b"kv@e1") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big", signed=True), msgpack.packb(payload)]


STORED = ["BlockStored", [b"\x01" * 32, b"\x02" * 32], None, list(range(32)), 16, None, "GPU"]


def test_array_like_batch() -> None:
    batch = decode_kv_event_message(
        frames([1.5, [STORED, ["BlockRemoved", [b"\x01" * 32], "GPU"], ["AllBlocksCleared"]], 0])
    )
    assert (batch.topic, batch.seq, batch.ts, batch.data_parallel_rank) == ("kv@e1", 7, 1.5, 0)
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == (b"\x01" * 32, b"\x02" * 32)
    assert stored.parent_block_hash is None and stored.block_size == 16
    assert stored.token_ids == tuple(range(32)) and stored.medium == "GPU"
    assert stored.lora_name is None
    assert removed == BlockRemoved(block_hashes=(b"\x01" * 32,), medium="GPU")
    assert cleared == AllBlocksCleared()


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # trailing defaults omitted (msgspec omit_defaults)
        (["BlockStored", [5], 4, [1, 2], 2], BlockStored((5,), 4, (1, 2), 2)),
        # newer vLLM: lora_name, extra_keys, group_idx ... appended
        (
            ["BlockStored", [5], None, [1, 2], 2, None, "GPU", "sql", [], 0, "full", None],
            BlockStored((5,), None, (1, 2), 2, lora_name="sql", medium="GPU"),
        ),
        (["BlockRemoved", [5, 6]], BlockRemoved((5, 6))),
        (
            {"type": "BlockStored", "block_hashes": [9], "token_ids": [3], "block_size": 1},
            BlockStored((9,), None, (3,), 1),
        ),
        ({"tag": "BlockRemoved", "block_hashes": [9]}, BlockRemoved((9,))),
        ({"type": "AllBlocksCleared"}, AllBlocksCleared()),
    ],
)
def test_event_forms(event: Any, expected: object) -> None:
    assert decode_kv_event_payload(msgpack.packb([0.0, [event]])).events == (expected,)


def test_map_form_batch() -> None:
    payload = {"ts": 2, "events": [["AllBlocksCleared"]], "data_parallel_rank": None}
    batch = decode_kv_event_payload(msgpack.packb(payload), topic="t", seq=3)
    assert (batch.ts, batch.seq, batch.topic, batch.data_parallel_rank) == (2.0, 3, "t", None)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # invalid msgpack byte
        msgpack.packb(5),
        msgpack.packb([0.0]),
        msgpack.packb(["x", []]),
        msgpack.packb([0.0, 5]),
        msgpack.packb([0.0, [], "rank"]),
        msgpack.packb([0.0, [["Nope"]]]),
        msgpack.packb([0.0, [[]]]),
        msgpack.packb([0.0, [5]]),
        msgpack.packb([0.0, [["BlockStored", [1.5], None, [1], 1]]]),
        msgpack.packb([0.0, [["BlockStored", [True], None, [1], 1]]]),
        msgpack.packb([0.0, [["BlockStored", 3, None, [1], 1]]]),
        msgpack.packb([0.0, [["BlockStored", [1], None, ["a"], 1]]]),
        msgpack.packb([0.0, [["BlockStored", [1], None, [1], 0]]]),
        msgpack.packb([0.0, [["BlockStored", [1], None, [1], 1, None, 5]]]),
    ],
)
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_kv_event_payload(payload)


@pytest.mark.parametrize("bad", [[b"t", b"\x00" * 8], [b"t", b"\x00" * 4, b"\x90"]])
def test_malformed_frames(bad: list[bytes]) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_kv_event_message(bad)
