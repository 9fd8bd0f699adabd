from __future__ import annotations

from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvcache.hashing import hash_token_blocks
from kvcache.index import PrefixIndex
from kvcache.precise import EndpointFeed

TOKENS = list(range(64))  # 4 blocks of 16


def batch(*events: object, seq: int = 0) -> KVEventBatch:
    return KVEventBatch(topic="t", seq=seq, ts=0.0, events=tuple(events))  # type: ignore[arg-type]


def test_rehash_matches_request_hashes_across_split_events() -> None:
    index = PrefixIndex()
    feed = EndpointFeed("e1", index, model="m")
    # the engine stores the prompt in two events; its hashes are opaque bytes
    feed.apply(batch(BlockStored((b"h0", b"h1"), None, tuple(TOKENS[:32]), 16), seq=0))
    feed.apply(batch(BlockStored((b"h2", b"h3"), b"h1", tuple(TOKENS[32:]), 16), seq=1))
    request = hash_token_blocks(TOKENS, 16, model="m")
    assert index.match(request) == {"e1": 4}
    # another model or adapter does not match
    assert index.match(hash_token_blocks(TOKENS, 16, model="other")) == {}
    stats = feed.stats()
    assert (stats.batches, stats.stored_blocks, stats.seq_gaps, stats.known_blocks) == (2, 4, 0, 4)


def test_lora_name_seeds_the_chain() -> None:
    index = PrefixIndex()
    feed = EndpointFeed("e1", index, model="m")
    feed.apply_event(BlockStored((1, 2), None, tuple(TOKENS[:32]), 16, lora_name="sql"))
    assert index.match(hash_token_blocks(TOKENS[:32], 16, model="m", adapter="sql")) == {"e1": 2}
    assert index.match(hash_token_blocks(TOKENS[:32], 16, model="m")) == {}


def test_remove_and_clear() -> None:
    index = PrefixIndex()
    feed = EndpointFeed("e1", index, model="m")
    feed.apply_event(BlockStored((1, 2, 3, 4), None, tuple(TOKENS), 16))
    request = hash_token_blocks(TOKENS, 16, model="m")
    feed.apply_event(BlockRemoved((3, 4, 99)))
    assert index.match(request) == {"e1": 2}
    assert feed.stats().removed_blocks == 2
    feed.apply(batch(AllBlocksCleared()))
    assert index.match(request) == {}
    assert feed.stats().known_blocks == 0


def test_unknown_parent_is_counted_not_guessed() -> None:
    index = PrefixIndex()
    feed = EndpointFeed("e1", index, model="m")
    feed.apply(batch(BlockStored((7,), b"missing", tuple(TOKENS[:16]), 16), seq=5))
    feed.apply(batch(seq=9))
    stats = feed.stats()
    assert stats.unchained == 1 and stats.stored_blocks == 0 and stats.seq_gaps == 1
    assert index.stats().precise_pairs == 0


def test_translation_table_is_bounded() -> None:
    index = PrefixIndex()
    feed = EndpointFeed("e1", index, model="m", max_blocks=2)
    feed.apply_event(BlockStored((1, 2, 3, 4), None, tuple(TOKENS), 16))
    assert feed.stats().known_blocks == 2


def test_feed_marks_endpoint_precise() -> None:
    index = PrefixIndex()
    EndpointFeed("e1", index, model="m")
    assert index.stats().precise_endpoints == 1
