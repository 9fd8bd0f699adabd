from __future__ import annotations

import dataclasses
import struct

import pytest

from kvcache import tier
from kvcache.tier import (
    HEADER,
    TierNamespace,
    block_key,
    decode_block,
    encode_block,
    hash_bytes,
    read_header,
    residency_namespace,
)

NS = TierNamespace(
    model="HuggingFaceTB/SmolLM2-135M-Instruct",
    dtype="bfloat16",
    kv_cache_dtype="auto",
    block_size=128,
    layout="cpu-hnd",
    hash_algo="sha256",
)
H = bytes(range(32))
PAYLOAD = bytes(range(256)) * 40


def test_prefix_is_stable_and_short() -> None:
    assert NS.prefix == dataclasses.replace(NS).prefix == b"kv1:%016x:" % NS.digest
    assert NS.prefix.startswith(b"kv1:") and NS.prefix.endswith(b":")
    assert len(NS.prefix) == 4 + 16 + 1
    assert b"{" not in NS.prefix  # no Redis Cluster hash tag


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"revision": "abc"},
        {"dtype": "float16"},
        {"kv_cache_dtype": "fp8"},
        {"block_size": 16},
        {"tp_rank": 1, "tp_size": 2},
        {"tp_size": 2},
        {"layout": "nhd"},
        {"hash_algo": "sha256_cbor"},
    ],
)
def test_every_namespace_field_changes_the_prefix(change: dict[str, object]) -> None:
    other = dataclasses.replace(NS, **change)  # type: ignore[arg-type]
    assert other.prefix != NS.prefix
    assert other.digest != NS.digest
    value = encode_block(NS, H, PAYLOAD)
    assert decode_block(other, H, value) is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"block_size": 0}, "block_size"), ({"tp_rank": 2, "tp_size": 2}, "tp_rank")],
)
def test_namespace_rejects_nonsense(kw: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TierNamespace(
            model="m",
            block_size=kw.get("block_size", 16),
            tp_rank=kw.get("tp_rank", 0),
            tp_size=kw.get("tp_size", 1),
        )


@pytest.mark.parametrize(
    ("block_hash", "suffix"),
    [
        (b"\x01\x02", b"0102"),
        (H, H.hex().encode()),
        (0, b"0" * 16),
        (0xABC, b"0000000000000abc"),
        ((1 << 64) - 1, b"f" * 16),
        (1 << 64, b"01" + b"0" * 16),
    ],
)
def test_block_key(block_hash: bytes | int, suffix: bytes) -> None:
    assert block_key(NS, block_hash) == NS.prefix + suffix
    assert block_key(NS, block_hash, prefix=b"p:") == b"p:" + suffix


def test_negative_hash_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        hash_bytes(-1)


@pytest.mark.parametrize("payload", [b"", b"x", PAYLOAD, bytes(2_949_120)])
@pytest.mark.parametrize("block_hash", [H, 7, (1 << 64) - 1])
def test_round_trip(payload: bytes, block_hash: bytes | int) -> None:
    value = encode_block(NS, block_hash, payload)
    assert len(value) == HEADER + len(payload)
    assert decode_block(NS, block_hash, value) == payload
    header = read_header(NS, block_hash, value)
    assert header is not None and not header.size_only and header.nbytes == len(payload)


def _patched(value: bytes, offset: int, fmt: str, new: int | bytes) -> bytes:
    out = bytearray(value)
    struct.pack_into("<" + fmt, out, offset, new)
    return bytes(out)


GOOD = encode_block(NS, H, PAYLOAD)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("none", None),
        ("empty", b""),
        ("short header", GOOD[: HEADER - 1]),
        ("magic", _patched(GOOD, 0, "4s", b"XXXX")),
        ("version", _patched(GOOD, 4, "B", 2)),
        ("unknown size-only flag on payload", _patched(GOOD, 5, "B", 1)),
        ("namespace", _patched(GOOD, 8, "Q", NS.digest ^ 1)),
        ("hash", _patched(GOOD, 16, "Q", 12345)),
        ("payload length", _patched(GOOD, 24, "Q", len(PAYLOAD) - 1)),
        ("nbytes", _patched(GOOD, 32, "Q", len(PAYLOAD) + 1)),
        ("checksum", _patched(GOOD, 40, "Q", 0)),
        ("truncated", GOOD[:-1]),
        ("extended", GOOD + b"\x00"),
        ("flipped payload byte", GOOD[:-1] + bytes([GOOD[-1] ^ 0xFF])),
        ("other block's value", encode_block(NS, b"\x00" * 32, PAYLOAD)),
        ("size-only value", encode_block(NS, H, b"", nbytes=len(PAYLOAD))),
        (
            "size-only with payload length",
            _patched(encode_block(NS, H, b"", nbytes=4) + b"abcd", 24, "Q", 4),
        ),
    ],
)
def test_every_mismatch_is_a_miss(name: str, value: bytes | None) -> None:
    assert decode_block(NS, H, value) is None, name


def test_size_only_values() -> None:
    value = encode_block(NS, 42, b"", nbytes=2_949_120)
    assert len(value) == HEADER
    header = read_header(NS, 42, value)
    assert header is not None
    assert header.size_only and header.nbytes == 2_949_120 and header.payload_len == 0
    assert decode_block(NS, 42, value) is None  # a reader wanting bytes: a miss
    assert read_header(NS, 43, value) is None
    assert read_header(residency_namespace("m", 128), 42, value) is None


@pytest.mark.parametrize(
    ("payload", "nbytes", "message"),
    [(b"abc", 4, "nbytes must equal"), (b"", -1, "non-negative")],
)
def test_encode_rejects_inconsistent_sizes(payload: bytes, nbytes: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_block(NS, H, payload, nbytes=nbytes)


def test_payload_given_with_matching_nbytes() -> None:
    assert decode_block(NS, H, encode_block(NS, H, b"abc", nbytes=3)) == b"abc"


def test_residency_namespace() -> None:
    a = residency_namespace("llama", 16)
    assert a.layout == tier.RESIDENCY_LAYOUT and a.hash_algo == tier.RESIDENCY_HASH_ALGO
    assert a.prefix != residency_namespace("llama", 32).prefix
    assert a.prefix != residency_namespace("qwen", 16).prefix
    assert a.prefix != TierNamespace(model="llama", block_size=16).prefix


def test_all_is_complete() -> None:
    public = {n for n in vars(tier) if not n.startswith("_") and n.isidentifier()}
    exported = set(tier.__all__)
    assert exported <= public
    assert {"TierNamespace", "block_key", "encode_block", "decode_block"} <= exported


def test_digest_covers_the_fields_only() -> None:
    import json

    import xxhash

    fields = {f.name: getattr(NS, f.name) for f in dataclasses.fields(NS) if f.init}
    raw = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    assert NS.canonical() == raw
    assert NS.digest == xxhash.xxh64_intdigest(raw)
    assert NS == dataclasses.replace(NS) and hash(NS) == hash(dataclasses.replace(NS))
