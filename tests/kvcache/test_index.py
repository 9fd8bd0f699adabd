from __future__ import annotations

import tracemalloc

import pytest

from kvcache.index import PrefixIndex


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(**kw: float) -> tuple[PrefixIndex, Clock]:
    clock = Clock()
    return PrefixIndex(clock=clock, **kw), clock  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("inserts", "query", "expected"),
    [
        ([], [1, 2, 3], {}),
        ([("a", [1, 2, 3])], [], {}),
        ([("a", [1, 2, 3])], [1, 2, 3], {"a": 3}),
        ([("a", [1, 2, 3])], [1, 2, 3, 4, 5], {"a": 3}),
        ([("a", [1, 2, 3])], [1, 9, 8], {"a": 1}),  # diverges after the first block
        ([("a", [1, 2, 3])], [2, 3], {"a": 2}),  # chained: a hash names its whole prefix
        ([("a", [1, 2, 3]), ("b", [1, 2])], [1, 2, 3], {"a": 3, "b": 2}),
        ([("a", [1]), ("b", [1, 2, 3, 4])], [1, 2, 3, 4], {"a": 1, "b": 4}),
        ([("a", [1, 2]), ("b", [1, 2])], [1, 2], {"a": 2, "b": 2}),
        ([("a", [7])], [7], {"a": 1}),
    ],
)
def test_match_counts_leading_blocks(
    inserts: list[tuple[str, list[int]]], query: list[int], expected: dict[str, int]
) -> None:
    index, _ = make()
    for endpoint, hashes in inserts:
        index.insert(endpoint, hashes)
    assert index.match(query) == expected


def test_binary_search_agrees_with_the_walk_on_chains() -> None:
    # Chains of a tree of prompts: shared heads, diverging tails, several holders.
    index, _ = make()
    walk, _ = make()
    walk.enable_precise("nobody")  # any event-fed endpoint makes match walk every pair
    chains = {"a": [1, 2, 3, 4, 5], "b": [1, 2, 6, 7], "c": [1, 8]}
    for endpoint, chain in chains.items():
        for n in range(1, len(chain) + 1):
            index.insert(endpoint, chain[:n])
            walk.insert(endpoint, chain[:n])
    for query in ([1, 2, 3, 4, 5, 9], [1, 2, 6, 7, 10], [1, 8, 11], [1, 2, 12], [1], [9]):
        assert index.match(query) == walk.match(query), query


def test_remove_and_drop_endpoint() -> None:
    index, _ = make()
    index.insert("a", [1, 2, 3])
    index.insert("b", [1, 2, 3])
    index.remove("a", [2, 99])
    assert index.match([1, 2, 3]) == {"a": 1, "b": 3}
    index.drop_endpoint("b")
    assert index.match([1, 2, 3]) == {"a": 1}
    assert index.stats().approx_pairs == 2  # a:1, a:3
    index.remove("a", [1, 3])
    assert index.stats().entries == 0


def test_ttl_expiry() -> None:
    index, clock = make(ttl_s=10.0)
    index.insert("a", [1, 2])
    clock.t = 5.0
    index.insert("b", [1, 5])  # refreshes block 1 only
    clock.t = 12.0
    assert index.match([1, 2]) == {"a": 1, "b": 1}  # block 2 expired, block 1 refreshed at 5
    clock.t = 16.0
    assert index.match([1, 5]) == {}
    stats = index.stats()
    assert stats.entries == 0 and stats.approx_pairs == 0 and stats.evicted_ttl == 4


def test_budget_evicts_tails_first() -> None:
    index, _ = make(max_pairs=5)
    index.insert("a", [1, 2, 3, 4])
    index.insert("b", [10, 11, 12])  # 7 pairs > 5: the two oldest entries go
    stats = index.stats()
    assert stats.pairs == 5 and stats.evicted_budget == 2
    # a's chain lost its tail (3, 4), not its head
    assert index.match([1, 2, 3, 4]) == {"a": 2}
    assert index.match([10, 11, 12]) == {"b": 3}


def test_shared_block_counts_one_pair_per_endpoint() -> None:
    index, _ = make()
    index.insert("a", [1, 2])
    index.insert("a", [1, 2])
    index.insert("b", [1])
    stats = index.stats()
    assert (stats.entries, stats.approx_pairs) == (2, 3)


def test_precise_entries_and_speculative_approximation() -> None:
    index, clock = make(speculative_ttl_s=2.0)
    index.insert("a", [1, 2, 3])
    index.insert("b", [1, 2, 3])
    index.enable_precise("a")
    assert index.match([1, 2, 3]) == {"a": 3, "b": 3}  # fresh: speculative entries count
    clock.t = 3.0
    assert index.match([1, 2, 3]) == {"b": 3}  # a's routed-only entries expired as speculative
    index.store_precise("a", [1, 2])
    assert index.match([1, 2, 3]) == {"a": 2, "b": 3}
    index.remove_precise("a", [2, 77])
    assert index.match([1, 2, 3]) == {"a": 1, "b": 3}
    index.store_precise("a", [1, 2])
    index.clear_precise("a")
    assert index.match([1, 2]) == {"b": 2}
    assert index.stats().precise_endpoints == 1
    index.drop_endpoint("a")
    assert index.stats().precise_endpoints == 0


def test_precise_store_is_idempotent_and_budgeted() -> None:
    index, _ = make(max_pairs=3)
    index.store_precise("a", [1, 2])
    index.store_precise("a", [1, 2])
    index.store_precise("b", [2])
    assert index.stats().precise_pairs == 3
    index.store_precise("b", [5])  # over budget: evict the oldest precise entry
    assert index.stats().precise_pairs == 3
    assert index.match([1]) == {}


@pytest.mark.parametrize("kw", [{"max_pairs": 0}, {"ttl_s": 0.0}, {"speculative_ttl_s": -1.0}])
def test_invalid_params(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PrefixIndex(**kw)  # type: ignore[arg-type]


def test_memory_estimate_within_2x_of_measured() -> None:
    tracemalloc.start()
    try:
        index = PrefixIndex(max_pairs=10**7)
        base = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            chain = [(i << 20) + j for j in range(20)]
            index.insert(f"e{i % 4}", chain)
            if i % 3 == 0:
                index.insert(f"e{(i + 1) % 4}", chain[:10])
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    estimate = index.stats().bytes_estimate
    assert used / 2 <= estimate <= used * 2, (used, estimate)
