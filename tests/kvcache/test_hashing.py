"""The shared block hash: chaining, seeding, full blocks only, determinism."""

from __future__ import annotations

import pytest

from kvcache import hash_byte_blocks, hash_token_blocks, root_hash

FULL_BLOCKS = [(0, 16, 0), (15, 16, 0), (16, 16, 1), (47, 16, 2), (754, 128, 5), (768, 128, 6)]


@pytest.mark.parametrize(("n_tokens", "block_size", "expected_blocks"), FULL_BLOCKS)
def test_only_full_blocks_are_hashed(n_tokens: int, block_size: int, expected_blocks: int) -> None:
    assert len(hash_token_blocks(list(range(n_tokens)), block_size, model="m")) == expected_blocks


@pytest.mark.parametrize(("n_bytes", "block_size", "expected_blocks"), FULL_BLOCKS)
def test_only_full_byte_blocks_are_hashed(
    n_bytes: int, block_size: int, expected_blocks: int
) -> None:
    assert len(hash_byte_blocks(b"x" * n_bytes, block_size, model="m")) == expected_blocks


def test_chain_covers_the_whole_prefix() -> None:
    a = hash_token_blocks([1] * 16 + [2] * 16, 16, model="m")
    b = hash_token_blocks([9] * 16 + [2] * 16, 16, model="m")
    assert a[0] != b[0]
    assert a[1] != b[1], "same second block under a different first block must differ"


def test_shared_prefix_gives_shared_leading_hashes() -> None:
    base = list(range(64))
    a = hash_token_blocks(base + [1] * 16, 16, model="m")
    b = hash_token_blocks(base + [2] * 16, 16, model="m")
    assert a[:4] == b[:4]
    assert a[4] != b[4]


@pytest.mark.parametrize(
    ("other_key"),
    [
        {"model": "other"},
        {"model": "m", "adapter": "lora-a"},
        {"model": "m", "cache_salt": "tenant-1"},
    ],
)
def test_seed_separates_models_adapters_and_salts(other_key: dict[str, str]) -> None:
    tokens = list(range(32))
    assert hash_token_blocks(tokens, 16, model="m") != hash_token_blocks(tokens, 16, **other_key)


def test_parent_continues_a_chain() -> None:
    tokens = list(range(48))
    whole = hash_token_blocks(tokens, 16, model="m")
    head = hash_token_blocks(tokens[:16], 16, model="m")
    tail = hash_token_blocks(tokens[16:], 16, model="m", parent=head[-1])
    assert head + tail == whole


def test_deterministic_known_value() -> None:
    # Pinned so a change of the hash (which would orphan every stored key) is deliberate.
    assert hash_token_blocks(list(range(40)), 16, model="m") == [
        17941252663022694138,
        15253661544373946385,
    ]
    assert root_hash("m") == root_hash("m", None, None)


def test_byte_blocks() -> None:
    data = b"x" * 100
    hashes = hash_byte_blocks(data, 32, model="m")
    assert len(hashes) == 3
    assert hash_byte_blocks(data + b"y", 32, model="m") == hashes
    assert hash_byte_blocks(b"z" + data, 32, model="m")[0] != hashes[0]


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size"):
        hash_token_blocks([1, 2], 0, model="m")
    with pytest.raises(ValueError, match="block_size"):
        hash_byte_blocks(b"ab", 0, model="m")


def test_byte_chain_covers_the_whole_prefix() -> None:
    a = hash_byte_blocks(b"a" * 32 + b"b" * 32, 32, model="m")
    b = hash_byte_blocks(b"z" * 32 + b"b" * 32, 32, model="m")
    assert a[1] != b[1], "same second block under a different first block must differ"
    assert hash_byte_blocks(b"a" * 64, 32, model="m") != hash_byte_blocks(b"a" * 64, 32, model="n")
