"""The vLLM connector's pure decisions (kvcache/tierplan.py): load sizes, the break-even gate,
the save planner across chunked-prefill steps and the extra config."""

from __future__ import annotations

import pytest

from kvcache.breakeven import TierCost
from kvcache.tierplan import (
    LAYOUT_CPU,
    BlockSave,
    LayoutError,
    SavePlanner,
    TierConfig,
    add_counts,
    cpu_layout,
    external_blocks,
    gated_blocks,
    load_pairs,
    max_loadable_blocks,
    write_retrying,
)

BS = 128


@pytest.mark.parametrize(
    ("prompt_len", "blocks"),
    [(0, 0), (1, 0), (128, 0), (129, 1), (256, 1), (257, 2), (925, 7), (1499, 11)],
)
def test_max_loadable_blocks_leaves_one_token_to_compute(prompt_len: int, blocks: int) -> None:
    assert max_loadable_blocks(prompt_len, BS) == blocks
    assert blocks * BS < max(prompt_len, 1)


@pytest.mark.parametrize(
    ("local", "leading", "prompt_len", "expected"),
    [
        (0, 0, 925, 0),  # the tier holds nothing
        (0, 7, 925, 7),  # all 7 loadable blocks from the tier
        (0, 8, 1024, 7),  # 8 full blocks held, one token must be computed: 7
        (256, 7, 925, 5),  # 2 blocks hit locally: the tier adds 5
        (896, 7, 925, 0),  # the local hit covers everything loadable
        (384, 2, 925, 0),  # the tier holds fewer leading blocks than the local hit
        (0, 3, 925, 3),  # a gap after block 3: only the leading 3
    ],
)
def test_external_blocks(local: int, leading: int, prompt_len: int, expected: int) -> None:
    got = external_blocks(
        local_tokens=local, tier_leading=leading, prompt_len=prompt_len, block_size=BS
    )
    assert got == expected


# SmolLM2 on CPU: 2,949,120 bytes per 128-token block (23,040 per token).
CPU_COST = TierCost(bytes_per_token=23040, prefill_tokens_per_s=120, rtt_s=0.0005)


@pytest.mark.parametrize(
    ("cost", "bandwidth", "expected"),
    [
        (CPU_COST, 1e9, (7, 0)),  # ~0.16 s fetch vs ~7.5 s prefill: load
        (CPU_COST, 1e6, (0, 7)),  # 1 MB/s tier: 161 s fetch, slower: declined, counted
        # A fast GPU (40k tokens/s) against a 1 GB/s tier: fetching loses.
        (TierCost(bytes_per_token=131072, prefill_tokens_per_s=40000), 1e9, (0, 7)),
    ],
)
def test_gated_blocks(cost: TierCost, bandwidth: float, expected: tuple[int, int]) -> None:
    got = gated_blocks(
        local_tokens=0,
        tier_leading=7,
        prompt_len=925,
        block_size=BS,
        cost=cost,
        bandwidth=bandwidth,
    )
    assert got == expected


def test_gated_blocks_nothing_to_load_is_not_a_decline() -> None:
    got = gated_blocks(
        local_tokens=896, tier_leading=7, prompt_len=925, block_size=BS, cost=CPU_COST, bandwidth=1
    )
    assert got == (0, 0)


def test_load_pairs_start_after_the_local_hit() -> None:
    ids = [10, 11, 12, 13, 14]
    hashes = [b"h0", b"h1", b"h2", b"h3", b"h4"]
    got = load_pairs(
        block_ids=ids, hashes=hashes, local_tokens=2 * BS, external_tokens=2 * BS, block_size=BS
    )
    assert got == [(12, b"h2"), (13, b"h3")]
    assert (
        load_pairs(block_ids=ids, hashes=hashes, local_tokens=0, external_tokens=0, block_size=BS)
        == []
    )
    with pytest.raises(ValueError, match="beyond"):
        load_pairs(
            block_ids=ids[:3], hashes=hashes, local_tokens=BS, external_tokens=3 * BS, block_size=BS
        )


def test_cpu_layout_accepts_the_tested_shape_only() -> None:
    assert cpu_layout((364, 3, 128, 128), block_size=128, num_kv_heads=3, head_size=64) == (
        LAYOUT_CPU
    )
    for shape in [
        (364, 2, 3, 128, 64),  # a GPU-style (2, blocks, ...) split of K and V
        (364, 128, 3, 128),  # NHD
        (364, 3, 128, 64),  # K only
    ]:
        with pytest.raises(LayoutError, match="tested CPU layout"):
            cpu_layout(shape, block_size=128, num_kv_heads=3, head_size=64)


def test_add_counts_sums_and_keeps_unknown_names() -> None:
    into = {"load_blocks": 2}
    assert add_counts(into, {"load_blocks": 3, "new_counter": 1}) == {
        "load_blocks": 5,
        "new_counter": 1,
    }


def test_tier_config_from_extra() -> None:
    cfg = TierConfig.from_extra({"redis_url": "redis://h:1/0", "ttl_s": 60})
    assert (cfg.redis_url, cfg.ttl_s, cfg.async_save, cfg.residency) == (
        "redis://h:1/0",
        60,
        True,
        True,
    )
    with pytest.raises(ValueError, match="unknown"):
        TierConfig.from_extra({"redis_url": "redis://h:1/0", "redis_ulr": "x"})
    with pytest.raises(ValueError, match="needs redis_url"):
        TierConfig.from_extra({})
    with pytest.raises(ValueError, match="positive"):
        TierConfig.from_extra({"redis_url": "redis://h:1/0", "save_queue_blocks": 0})
    with pytest.raises(ValueError, match="save_retries"):
        TierConfig.from_extra({"redis_url": "redis://h:1/0", "save_retries": -1})
    no_retry = TierConfig.from_extra({"redis_url": "redis://h:1/0", "save_retries": 0})
    assert no_retry.save_retries == 0


def _indices(saves: list[BlockSave]) -> list[int]:
    return [s.index for s in saves]


def test_save_planner_one_step_saves_every_full_prompt_block() -> None:
    p = SavePlanner(BS)
    hashes = [b"a", b"b", b"c"]  # a 3-block (384..511-token) prompt
    p.track("r", hashes=hashes, block_ids=[5, 6, 7, 8], present=0)
    saves = p.step("r", block_ids=[5, 6, 7, 8], replace=True, computed_before=0, scheduled=400)
    assert saves == [
        BlockSave(0, 5, b"a"),
        BlockSave(1, 6, b"b"),
        BlockSave(2, 7, b"c"),
    ]
    # Decode steps after the prefill save nothing more.
    assert p.step("r", block_ids=None, replace=False, computed_before=400, scheduled=1) == []


def test_save_planner_across_chunked_prefill_steps() -> None:
    """--max-num-batched-tokens 200 over a 700-token prompt: blocks fill at 128, 256 | 384 |
    512 | 640; ids arrive as the scheduler allocates them."""
    p = SavePlanner(BS)
    hashes = [b"0", b"1", b"2", b"3", b"4"]
    p.track("r", hashes=hashes, block_ids=[], present=0, residency=[100, 101, 102, 103, 104])
    steps = [
        # (new ids, replace, computed before, scheduled) -> expected block indices
        (([20, 21], True, 0, 200), [0]),  # 200 tokens: block 0 full, block 1 partial
        (([22], False, 200, 200), [1, 2]),  # 400: blocks 1 and 2 full
        (([23], False, 400, 200), [3]),  # 600: block 3
        (([24, 25], False, 600, 100), [4]),  # 700: block 4 (the 5th full block)
        ((None, False, 700, 1), []),  # decode
    ]
    seen: list[BlockSave] = []
    for (ids, replace, before, scheduled), expected in steps:
        saves = p.step(
            "r", block_ids=ids, replace=replace, computed_before=before, scheduled=scheduled
        )
        assert _indices(saves) == expected
        seen.extend(saves)
    assert [(s.block_id, s.block_hash, s.residency_hash) for s in seen] == [
        (20, b"0", 100),
        (21, b"1", 101),
        (22, b"2", 102),
        (23, b"3", 103),
        (24, b"4", 104),
    ]


def test_save_planner_skips_blocks_the_tier_holds() -> None:
    p = SavePlanner(BS)
    hashes = [b"0", b"1", b"2", b"3"]
    # Lookup found 2 leading blocks (loaded); blocks 2, 3 are new.
    p.track("r", hashes=hashes, block_ids=[1, 2, 3, 4], present=2)
    saves = p.step("r", block_ids=[1, 2, 3, 4], replace=True, computed_before=256, scheduled=300)
    assert _indices(saves) == [2, 3]


def test_save_planner_replans_after_a_failed_load() -> None:
    """vLLM truncates computed tokens at the first failed block and recomputes: the worker
    skipped the failed step's saves, so the blocks from there on are planned again."""
    p = SavePlanner(BS)
    hashes = [b"0", b"1", b"2", b"3", b"4"]
    p.track("r", hashes=hashes, block_ids=[9, 8, 7, 6, 5, 4], present=5)
    # Step 1: 5 blocks loaded (640 computed), 20 tokens scheduled; nothing new to save.
    assert p.step("r", block_ids=[9, 8, 7, 6, 5, 4], replace=True, computed_before=640,
                  scheduled=20) == []  # fmt: skip
    # Block 2 failed: vLLM sets computed to 256 and schedules the rest again.
    saves = p.step("r", block_ids=None, replace=False, computed_before=256, scheduled=404)
    assert _indices(saves) == [2, 3, 4]
    assert [s.block_id for s in saves] == [7, 6, 5]


def test_save_planner_preemption_replaces_block_ids() -> None:
    p = SavePlanner(BS)
    p.track("r", hashes=[b"0", b"1"], block_ids=[1], present=0)
    assert _indices(p.step("r", block_ids=[1], replace=True, computed_before=0, scheduled=128)) == [
        0
    ]
    # Preempted and re-admitted: tracked again, resumed with a new block list.
    p.track("r", hashes=[b"0", b"1"], block_ids=[], present=1)
    saves = p.step("r", block_ids=[7, 8, 9], replace=True, computed_before=128, scheduled=200)
    assert [(s.index, s.block_id) for s in saves] == [(1, 8)]


def test_save_planner_is_bounded_and_forgets() -> None:
    p = SavePlanner(BS, max_requests=2)
    for rid in ("a", "b", "c"):
        p.track(rid, hashes=[b"x"], block_ids=[1], present=0)
    assert len(p) == 2
    assert p.step("a", block_ids=None, replace=False, computed_before=0, scheduled=128) == []
    assert len(p.step("c", block_ids=None, replace=False, computed_before=0, scheduled=128)) == 1
    p.finish("c")
    p.finish("never-tracked")
    assert len(p) == 1


def test_save_planner_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        SavePlanner(0)
    with pytest.raises(ValueError, match="one to one"):
        SavePlanner(BS).track("r", hashes=[b"a", b"b"], block_ids=[], present=0, residency=[1])


@pytest.mark.parametrize(
    ("answers", "retries", "expected", "calls", "pauses"),
    [
        ([True], 2, (True, 0), [False], 0),  # the first try wins: no pause
        ([False, True], 2, (True, 1), [False, False], 1),
        ([False, False, True], 2, (True, 2), [False, False, True], 2),
        ([False, False, False], 2, (False, 2), [False, False, True], 2),  # spent: last=True
        ([False], 0, (False, 0), [True], 0),  # no retries: the only try is the last
    ],
)
def test_write_retrying(
    answers: list[bool],
    retries: int,
    expected: tuple[bool, int],
    calls: list[bool],
    pauses: int,
) -> None:
    seen: list[bool] = []
    paused: list[None] = []
    left = iter(answers)

    def write(last: bool) -> bool:
        seen.append(last)
        return next(left)

    assert write_retrying(write, retries=retries, pause=lambda: paused.append(None)) == expected
    assert seen == calls
    assert len(paused) == pauses
