"""The KV tier in the pure core: loads beyond the local hit, the break-even gate, the connector
counters, the blocks queued for writing, and the pseudo-text generator."""

from __future__ import annotations

from dataclasses import replace

import pytest

from enginesim.core.api import RequestOutput, SimRequest, StepResult
from enginesim.core.engine import EngineCore
from enginesim.core.profile import EngineProfile
from enginesim.core.request import TokenStream
from enginesim.core.tier import TierCost
from enginesim.core.tokenizer import TEXT_PIECES, ChatCodec, HashTokenizer, text_piece_ids
from kvcache.hashing import hash_token_blocks
from tests.enginesim.tiny_profile import tiny_profile

# 4-token blocks; one token of KV = 1 byte at 1 byte/s: fetching T tokens costs T s + 0.25 s,
# recomputing them 0.25 s per token plus attention: the gate says no. 64 bytes/s says yes.
SLOW = {"kv_bytes_per_token": 1.0, "kv_tier_read_bytes_per_s": 1.0, "kv_tier_rtt_s": 0.25}
FAST = {"kv_bytes_per_token": 1.0, "kv_tier_read_bytes_per_s": 64.0, "kv_tier_rtt_s": 0.25}


def _profile(**kw: object) -> EngineProfile:
    return tiny_profile(**{"num_gpu_blocks": 64, **FAST, **kw})


def _req(rid: str, prompt: tuple[int, ...], *, tier_blocks: int = 0) -> SimRequest:
    return SimRequest(rid, prompt, 2, 0.0, ignore_eos=True, tier_blocks=tier_blocks)


def _run(core: EngineCore) -> tuple[list[StepResult], dict[str, RequestOutput]]:
    steps: list[StepResult] = []
    first: dict[str, RequestOutput] = {}
    for _ in range(1000):
        if not core.has_work():
            return steps, first
        res = core.step(0.0)
        steps.append(res)
        for o in res.outputs:
            if o.first_token:
                first[o.request_id] = o
    raise AssertionError("did not finish")


PROMPT = tuple(range(100, 118))  # 18 tokens: 4 full blocks, 4 loadable ((18 - 1) // 4)


def test_computed_prompt_blocks_are_queued_for_the_tier_once() -> None:
    core = EngineCore(_profile(), kv_tier=True)
    core.add_request(_req("a", PROMPT))
    _run(core)
    writes = core.take_tier_writes()
    assert writes == hash_token_blocks(PROMPT[:16], 4, model="m")
    assert core.take_tier_writes() == []
    # The same prompt again hits locally: nothing new to write.
    core.add_request(_req("b", PROMPT))
    _run(core)
    assert core.take_tier_writes() == []


@pytest.mark.parametrize(
    ("local_prefix", "tier_blocks", "loaded", "queried"),
    [
        (0, 4, 16, 18),  # all loadable blocks from the tier
        (0, 9, 16, 18),  # the tier holds more than loadable: one token is always computed
        (0, 2, 8, 18),  # a partial chain: only its leading blocks
        (8, 4, 8, 10),  # 2 blocks hit locally, 2 more from the tier; queries = beyond local
        (16, 4, 0, 2),  # the local hit already covers what the tier holds
        (0, 0, 0, 18),  # nothing in the tier: queried, not hit
    ],
)
def test_load_beyond_the_local_hit_and_connector_counters(
    local_prefix: int, tier_blocks: int, loaded: int, queried: int
) -> None:
    core = EngineCore(_profile(), kv_tier=True)
    if local_prefix:
        core.add_request(_req("warm", PROMPT[:local_prefix] + (999,)))
        _run(core)
        core.take_tier_writes()
    before = core.stats()
    core.add_request(_req("r", PROMPT, tier_blocks=tier_blocks))
    steps, first = _run(core)
    out = first["r"]
    assert out.num_external_cached_tokens == loaded
    assert out.num_cached_tokens == local_prefix + loaded
    st = core.stats()
    assert st.external_prefix_cache_queries - before.external_prefix_cache_queries == queried
    assert st.external_prefix_cache_hits - before.external_prefix_cache_hits == loaded
    assert st.prefix_cache_hits - before.prefix_cache_hits == local_prefix
    tier = TierCost.from_profile(core.profile)
    assert sum(s.tier_load_s for s in steps) == (tier.fetch_s(loaded) if loaded else 0.0)
    # Written: the prompt's full blocks neither hit locally nor loaded.
    assert len(core.take_tier_writes()) == 4 - (local_prefix + loaded) // 4


def test_load_time_is_charged_to_the_admitting_step() -> None:
    p = _profile()
    cold, warm = EngineCore(p, kv_tier=True), EngineCore(p, kv_tier=True)
    cold.add_request(_req("r", PROMPT))
    warm.add_request(_req("r", PROMPT, tier_blocks=4))
    (c0, *_), _ = _run(cold)
    (w0, *_), _ = _run(warm)
    assert w0.tier_load_s == TierCost.from_profile(p).fetch_s(16) == 16 / 64 + 0.25
    assert w0.num_prefill_tokens == 2 and c0.num_prefill_tokens == 18
    assert w0.duration_s < c0.duration_s


def test_async_loads_run_beside_the_batch() -> None:
    # kv_tier_async: the loading request waits fetch_s holding its blocks (counted waiting),
    # while another request computes; the load time is in no step's duration.
    p = _profile(kv_tier_read_bytes_per_s=4.0)  # 16 tokens: 4 s + 0.25 s, recompute ~4.5 s
    core = EngineCore(p, kv_tier=True, kv_tier_async=True)
    core.add_request(_req("loads", PROMPT, tier_blocks=4))
    core.add_request(_req("other", tuple(range(500, 506))))
    now, first_at = 0.0, {}
    waiting_seen = 0
    for _ in range(1000):
        if not core.has_work():
            break
        res = core.step(now)
        assert res.tier_load_s == 0.0
        waiting_seen = max(waiting_seen, core.stats().num_waiting)
        now += res.duration_s
        for o in res.outputs:
            if o.first_token:
                first_at[o.request_id] = (now, o.num_external_cached_tokens)
    fetch = TierCost.from_profile(p).fetch_s(16)
    assert first_at["other"][0] < fetch < first_at["loads"][0]
    assert first_at["loads"][1] == 16
    assert waiting_seen == 1
    core.add_request(_req("gone", tuple(range(700, 718)), tier_blocks=4))
    idle = core.step(now)  # parked: only a load in flight, an idle step
    assert idle.outputs == () and 0 < idle.duration_s <= 0.02
    assert core.stats().num_waiting == 1
    core.abort_request("gone")
    assert not core.has_work() and core.kv.num_free == core.kv.num_blocks


def test_break_even_gate_declines_slow_fetches() -> None:
    core = EngineCore(_profile(**SLOW), kv_tier=True)
    core.add_request(_req("r", PROMPT, tier_blocks=4))
    steps, first = _run(core)
    assert first["r"].num_external_cached_tokens == 0
    st = core.stats()
    assert (st.tier_declines, st.external_prefix_cache_hits) == (1, 0)
    assert st.external_prefix_cache_queries == 18
    assert all(s.tier_load_s == 0 for s in steps)
    assert len(core.take_tier_writes()) == 4


def test_without_a_tier_nothing_is_loaded_counted_or_written() -> None:
    core = EngineCore(_profile())
    core.add_request(_req("r", PROMPT, tier_blocks=4))
    _, first = _run(core)
    assert first["r"].num_external_cached_tokens is None
    assert first["r"].num_cached_tokens == 0
    st = core.stats()
    assert (st.external_prefix_cache_queries, st.external_prefix_cache_hits) == (0, 0)
    assert core.take_tier_writes() == []


@pytest.mark.parametrize(
    ("tokens", "start", "fetch", "recompute", "worth"),
    [
        (16, 0, 16 / 64 + 0.25, 16 * 0.25 + 2.0**-7 * 16 * 8, True),
        (4, 8, 4 / 64 + 0.25, 4 * 0.25 + 2.0**-7 * 4 * 10, True),
        (0, 0, 0.25, 0.0, False),
    ],
)
def test_tier_cost_table(
    tokens: int, start: int, fetch: float, recompute: float, worth: bool
) -> None:
    cost = TierCost.from_profile(_profile())
    assert cost.fetch_s(tokens) == pytest.approx(fetch)
    assert cost.recompute_s(tokens, start) == pytest.approx(recompute)
    assert cost.worth_loading(tokens, start) is worth


def test_tier_needs_kv_bytes_per_token() -> None:
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        EngineCore(replace(_profile(), kv_bytes_per_token=0.0), kv_tier=True)


def test_hash_model_seeds_the_block_hashes() -> None:
    a = EngineCore(_profile(), kv_tier=True, hash_model="served")
    b = EngineCore(_profile(), kv_tier=True)
    for core in (a, b):
        core.add_request(_req("r", PROMPT))
        _run(core)
    assert a.take_tier_writes() != b.take_tier_writes()


# --- pseudo-text ----------------------------------------------------------------------------


def test_text_pieces_round_trip_through_the_hash_tokenizer() -> None:
    codec = ChatCodec(HashTokenizer(49152))
    ids = text_piece_ids(codec)
    assert len(ids) == len(TEXT_PIECES)
    assert [codec.decode([i]) for i in ids] == list(TEXT_PIECES)
    assert codec.decode(codec.encode("a, b. 7\n")).count(",") == 1


def test_token_stream_mixes_text_pieces_deterministically() -> None:
    text = (7, 8, 9)
    stream = TokenStream(seed=1, request_id="r", lo=100, hi=1000, text_ids=text,
                         text_probability=0.3)  # fmt: skip
    again = TokenStream(seed=1, request_id="r", lo=100, hi=1000, text_ids=text,
                        text_probability=0.3)  # fmt: skip
    toks = [stream.next() for _ in range(2000)]
    assert toks == [again.next() for _ in range(2000)]
    share = sum(t in text for t in toks) / len(toks)
    assert 0.25 < share < 0.35
    plain = TokenStream(seed=1, request_id="r", lo=100, hi=1000)
    assert all(100 <= plain.next() < 1000 for _ in range(200))
    with pytest.raises(ValueError, match="text_probability"):
        TokenStream(seed=1, request_id="r", lo=0, hi=10, text_probability=2.0)
