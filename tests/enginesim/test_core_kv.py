"""KV cache: eviction order, prefix-hit accounting, events, abort, isolation by adapter/salt."""

from __future__ import annotations

from enginesim.core.api import KVEvent, SimRequest
from enginesim.core.engine import EngineCore
from enginesim.core.kv import KVCache
from enginesim.core.profile import EngineProfile, load_profile
from kvcache.hashing import hash_token_blocks
from tests.enginesim.tiny_profile import tiny_profile


def _profile(**kw: object) -> EngineProfile:
    return tiny_profile(**kw)


def _req(rid: str, prompt: tuple[int, ...], max_tokens: int = 1, **kw: object) -> SimRequest:
    return SimRequest(rid, prompt, max_tokens, 0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def _drain(core: EngineCore, limit: int = 10_000) -> list[str]:
    finished: list[str] = []
    for _ in range(limit):
        if not core.has_work():
            return finished
        for out in core.step(0.0).outputs:
            if out.finished:
                finished.append(out.request_id)
    raise AssertionError("engine did not drain")


# --- the block pool on its own --------------------------------------------------------------
def test_free_queue_is_lru_and_tail_first() -> None:
    kv = KVCache(num_blocks=8, block_size=2)
    a = kv.allocate(3)
    b = kv.allocate(2)
    assert a == [0, 1, 2] and b == [3, 4]
    assert kv.free_order() == [5, 6, 7]
    kv.free(a)  # chain tail first: 2 before 1 before 0
    kv.free(b)
    assert kv.free_order() == [5, 6, 7, 2, 1, 0, 4, 3]
    assert kv.usage == 0.0


def test_eviction_emits_block_removed_in_lru_order() -> None:
    kv = KVCache(num_blocks=4, block_size=2)
    blocks = kv.allocate(4)
    assert blocks is not None
    hashes = [11, 12, 13, 14]
    kv.cache(blocks, hashes, start=0, stop=4, tokens=list(range(8)), lora_name=None)
    stored = kv.take_events()
    assert stored == [
        KVEvent("BlockStored", (11, 12, 13, 14), None, tuple(range(8)), 2, None),
    ]
    kv.free(blocks[:2])  # request X held blocks 0,1
    kv.free(blocks[2:])  # request Y held blocks 2,3
    assert kv.allocate(3) == [1, 0, 3]
    assert kv.take_events() == [
        KVEvent("BlockRemoved", (12,)),
        KVEvent("BlockRemoved", (11,)),
        KVEvent("BlockRemoved", (14,)),
    ]
    assert kv.longest_hit(hashes, 4) == []  # the chain head is gone
    assert kv.num_cached == 1 and kv.block_hash(2) == 13


def test_touch_takes_cached_blocks_out_of_the_free_queue() -> None:
    kv = KVCache(num_blocks=4, block_size=2)
    blocks = kv.allocate(2)
    assert blocks == [0, 1]
    kv.cache(blocks, [7, 8], start=0, stop=2, tokens=[1, 2, 3, 4], lora_name="x")
    kv.free(blocks)
    hit = kv.longest_hit([7, 8, 9], 3)
    assert hit == [0, 1]
    assert kv.can_allocate(2, hit) and not kv.can_allocate(3, hit)
    kv.touch(hit)
    assert kv.free_order() == [2, 3] and kv.ref_count(0) == 1
    assert kv.usage == 0.5


def test_event_buffer_is_bounded() -> None:
    kv = KVCache(num_blocks=3, block_size=1, max_events=2)
    blocks = kv.allocate(3)
    assert blocks is not None
    kv.cache(blocks, [1, 2, 3], start=0, stop=3, tokens=[0, 0, 0], lora_name=None)
    kv.free(blocks)
    assert kv.allocate(3) == [2, 1, 0]
    assert [e.block_hashes for e in kv.take_events()] == [(2,), (1,)]
    assert kv.dropped_events == 2


# --- prefix-cache accounting through the engine ------------------------------------------------
def test_754_token_prompt_hits_640_on_repeat() -> None:
    core = EngineCore(load_profile("cpu-smollm2"), seed=3)
    prompt = tuple(range(100, 854))
    hits: list[int | None] = []
    for i in range(3):
        core.add_request(_req(f"r{i}", prompt))
        first = [o for o in core.step(0.0).outputs if o.first_token]
        hits.append(first[0].num_cached_tokens)
        assert not core.has_work()
        stats = core.stats()
        assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (754 * (i + 1), 640 * i)
    assert hits == [0, 640, 640]
    assert core.stats().prompt_tokens == 3 * 754


def test_fully_cached_prompt_still_recomputes_its_last_block() -> None:
    core = EngineCore(load_profile("cpu-smollm2"))
    prompt = tuple(range(768))  # exactly 6 blocks of 128
    core.add_request(_req("a", prompt))
    assert core.step(0.0).num_prefill_tokens == 768
    core.add_request(_req("b", prompt))
    res = core.step(0.0)
    assert res.outputs[0].num_cached_tokens == 640
    assert res.num_prefill_tokens == 128


def test_block_stored_events_carry_chain_and_tokens() -> None:
    p = load_profile("cpu-smollm2")
    core = EngineCore(p, seed=1)
    prompt = tuple(range(1000, 1754))
    core.add_request(_req("r", prompt, max_tokens=15))
    outputs = list(core.step(0.0).outputs[0].new_token_ids)
    hashes = hash_token_blocks(prompt, 128, model="smollm2")
    assert core.take_events() == [
        KVEvent("BlockStored", tuple(hashes), None, prompt[:640], 128, None)
    ]
    for step in range(1, 15):  # 754 + 14 computed tokens fill block 6 on the 14th decode
        res = core.step(0.0)
        outputs.extend(res.outputs[0].new_token_ids)
        if step < 14:
            assert core.take_events() == []
    assert res.outputs[0].finished == "length" and len(outputs) == 15
    (event,) = core.take_events()
    block6 = prompt[640:] + tuple(outputs[:14])
    assert len(block6) == 128
    assert event == KVEvent(
        "BlockStored",
        tuple(hash_token_blocks(block6, 128, model="smollm2", parent=hashes[-1])),
        hashes[-1],
        block6,
        128,
        None,
    )


def test_adapter_and_salt_isolate_prefixes() -> None:
    core = EngineCore(_profile(max_loras=1))
    core.load_adapter("sql", size_bytes=0)
    prompt = tuple(range(9))  # 2 full blocks; a repeat can hit both
    core.add_request(_req("base", prompt))
    _drain(core)
    core.add_request(_req("lora", prompt, adapter="sql"))
    core.add_request(_req("salted", prompt, cache_salt="tenant"))
    _drain(core)
    core.add_request(_req("base2", prompt))
    core.add_request(_req("lora2", prompt, adapter="sql"))
    _drain(core)
    s = core.stats()
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (45, 16)
    stored = [e for e in core.take_events() if e.kind == "BlockStored"]
    assert [e.lora_name for e in stored] == [None, "sql", None]


def test_abort_frees_blocks_but_keeps_them_cached() -> None:
    core = EngineCore(_profile())
    prompt = tuple(range(12))
    core.add_request(_req("a", prompt, max_tokens=50))
    core.step(0.0)
    assert core.stats().kv_cache_usage == 3 / 16  # blocks cover computed tokens only
    core.abort_request("a")
    core.abort_request("unknown")  # no-op
    assert core.stats().kv_cache_usage == 0.0 and not core.has_work()
    core.add_request(_req("b", prompt))
    res = core.step(0.0)
    assert res.outputs[0].num_cached_tokens == 8  # (12 - 1) // 4 = 2 blocks


def test_reset_prefix_cache() -> None:
    core = EngineCore(_profile())
    core.add_request(_req("a", tuple(range(8)), max_tokens=3))
    core.step(0.0)
    assert core.reset_prefix_cache() is False  # blocks in use
    _drain(core)
    core.take_events()
    assert core.reset_prefix_cache() is True
    assert core.take_events() == [KVEvent("AllBlocksCleared")]
    core.add_request(_req("b", tuple(range(8))))
    assert core.step(0.0).outputs[0].num_cached_tokens == 0


def _check_invariants(core: EngineCore) -> None:
    kv, sched = core.kv, core.scheduler
    refs = [0] * kv.num_blocks
    for state in sched.running:
        assert len(state.blocks) * kv.block_size >= state.num_computed
        assert state.num_cached_blocks <= len(state.blocks)
        for b in state.blocks:
            refs[b] += 1
    for state in sched.waiting:
        assert state.blocks == [] and state.num_computed == 0
    assert refs == [kv.ref_count(b) for b in range(kv.num_blocks)]
    assert sorted(kv.free_order()) == [b for b in range(kv.num_blocks) if refs[b] == 0]
    hashed = [kv.block_hash(b) for b in range(kv.num_blocks)]
    assert kv.num_cached == sum(h is not None for h in hashed)
    assert len(sched.running) <= core.profile.max_num_seqs


def test_random_workload_keeps_block_accounting_consistent() -> None:
    import random

    rng = random.Random(42)
    core = EngineCore(_profile(num_gpu_blocks=24, max_num_seqs=6, max_num_batched_tokens=24))
    stems = [tuple(rng.randrange(1000) for _ in range(12)) for _ in range(3)]
    live: list[str] = []
    for i in range(400):
        if rng.random() < 0.4:
            prompt = rng.choice(stems) + tuple(rng.randrange(1000) for _ in range(rng.randrange(9)))
            core.add_request(_req(f"q{i}", prompt, max_tokens=rng.randrange(1, 20)))
            live.append(f"q{i}")
        if live and rng.random() < 0.05:
            core.abort_request(live.pop(rng.randrange(len(live))))
        res = core.step(0.0)
        for out in res.outputs:
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
        _check_invariants(core)
    _drain(core)
    _check_invariants(core)
    s = core.stats()
    assert s.num_preemptions > 0 and s.prefix_cache_hits > 0  # the workload exercised both
    assert s.kv_cache_usage == 0.0 and core.kv.num_free == 24
