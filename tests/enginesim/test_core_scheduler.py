"""Scheduler: FCFS admission, budgets, chunked prefill, preemption and recompute, outputs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from enginesim.core.api import KVEvent, RequestOutput, SimRequest
from enginesim.core.engine import EngineCore
from enginesim.core.profile import EngineProfile
from kvcache.hashing import hash_token_blocks
from tests.enginesim.tiny_profile import tiny_profile


def _profile(**kw: object) -> EngineProfile:
    return tiny_profile(**{"num_gpu_blocks": 6, **kw})


def _req(rid: str, prompt: tuple[int, ...], max_tokens: int, **kw: object) -> SimRequest:
    return SimRequest(rid, prompt, max_tokens, 0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def _tokens_alone(profile: EngineProfile, req: SimRequest, seed: int) -> list[int]:
    core = EngineCore(replace(profile, num_gpu_blocks=1000), seed=seed)
    core.add_request(req)
    out: list[int] = []
    for _ in range(1000):
        if not core.has_work():
            return out
        for o in core.step(0.0).outputs:
            out.extend(o.new_token_ids)
    raise AssertionError("did not finish")


def test_newest_running_request_is_preempted_and_later_recomputed() -> None:
    p = _profile()
    core = EngineCore(p, seed=5)
    a = _req("A", tuple(range(1, 9)), max_tokens=10)
    b = _req("B", tuple(range(101, 109)), max_tokens=10)
    core.add_request(a)
    core.add_request(b)
    tokens: dict[str, list[int]] = {"A": [], "B": []}
    results = []
    for _ in range(5):  # both run; 6 blocks hold 2 x 12 computed tokens
        res = core.step(0.0)
        results.append(res)
        for o in res.outputs:
            tokens[o.request_id].extend(o.new_token_ids)
    assert [len(tokens["A"]), len(tokens["B"])] == [5, 5]
    assert core.stats().num_preemptions == 0 and core.kv.num_free == 0
    core.take_events()

    res = core.step(0.0)  # A needs a 4th block: B (newest) is preempted, its tail evicted
    assert [o.request_id for o in res.outputs] == ["A"]
    tokens["A"].extend(res.outputs[0].new_token_ids)
    s = core.stats()
    assert (s.num_preemptions, s.num_running, s.num_waiting) == (1, 1, 1)
    b_hashes = hash_token_blocks(b.prompt_token_ids + tuple(tokens["B"][:4]), 4, model="m")
    assert core.take_events() == [KVEvent("BlockRemoved", (b_hashes[2],))]
    assert res.duration_s == 0.5 + 0.125 + 13 * 2.0**-9  # one decode at context 13

    for _ in range(4):  # A runs alone; B cannot fit 2 new blocks + 2 hits into 2 free
        res = core.step(0.0)
        assert [o.request_id for o in res.outputs] == ["A"]
        tokens["A"].extend(res.outputs[0].new_token_ids)
    assert res.outputs[0].finished == "length" and len(tokens["A"]) == 10

    res = core.step(0.0)  # B re-admitted: 1 block still cached, 9 tokens recomputed
    (out,) = res.outputs
    assert out == RequestOutput("B", (out.new_token_ids[0],), None, None, False)
    assert (res.num_prefill_tokens, res.num_decode_tokens) == (9, 0)
    assert res.duration_s == 0.5 + 9 * 0.25 + 9 * (4 + 4.5) * 2.0**-7
    tokens["B"].extend(out.new_token_ids)
    for _ in range(100):
        if not core.has_work():
            break
        for o in core.step(0.0).outputs:
            tokens["B"].extend(o.new_token_ids)
    s = core.stats()
    assert (s.num_preemptions, s.prefix_cache_queries, s.prefix_cache_hits) == (1, 16, 0)
    assert s.generation_tokens == 20 and s.kv_cache_usage == 0.0
    # Preemption changes timing, never the tokens.
    assert tokens["A"] == _tokens_alone(p, a, seed=5)
    assert tokens["B"] == _tokens_alone(p, b, seed=5)


def test_fcfs_admission_respects_max_num_seqs_and_budget() -> None:
    core = EngineCore(_profile(num_gpu_blocks=100, max_num_seqs=2, max_num_batched_tokens=10))
    for i in range(3):
        core.add_request(_req(f"r{i}", tuple(range(10 * i, 10 * i + 6)), max_tokens=2))
    res = core.step(0.0)  # r0 takes 6 tokens, r1 a 4-token chunk; r2 over max_num_seqs
    assert [o.request_id for o in res.outputs] == ["r0"]
    assert (res.num_prefill_tokens, core.stats().num_running, core.stats().num_waiting) == (
        10,
        2,
        1,
    )
    assert res.duration_s == 0.5 + 10 * 0.25 + (6 * 3 + 4 * 2) * 2.0**-7
    res = core.step(0.0)  # r0 decodes (finishes), r1 finishes its prefill (2 tokens at 4)
    assert [(o.request_id, o.finished, o.first_token) for o in res.outputs] == [
        ("r0", "length", False),
        ("r1", None, True),
    ]
    assert res.duration_s == 0.5 + 0.125 + 7 * 2.0**-9 + 2 * 0.25 + 2 * 5 * 2.0**-7
    res = core.step(0.0)  # r1 decodes and finishes, r2 admitted and prefilled
    assert [(o.request_id, o.finished) for o in res.outputs] == [("r1", "length"), ("r2", None)]


def test_first_scheduled_ids_name_each_request_once() -> None:
    """vLLM's SCHEDULED event: the first step that computes any of a request's tokens."""
    core = EngineCore(_profile(num_gpu_blocks=100, max_num_seqs=2, max_num_batched_tokens=10))
    for i in range(3):
        core.add_request(_req(f"r{i}", tuple(range(10 * i, 10 * i + 6)), max_tokens=2))
    firsts = [core.step(0.0).first_scheduled_ids for _ in range(4)]
    # Step 1: r0 whole and r1 a chunk (no output for r1 yet); r2 waits for a free seat.
    assert firsts == [("r0", "r1"), (), ("r2",), ()]


def test_first_scheduled_ids_not_repeated_after_preemption() -> None:
    core = EngineCore(_profile(num_gpu_blocks=4))
    core.add_request(_req("a", tuple(range(8)), max_tokens=6))
    core.add_request(_req("b", tuple(range(100, 108)), max_tokens=6))
    seen: list[str] = []
    for _ in range(100):
        if not core.has_work():
            break
        seen.extend(core.step(0.0).first_scheduled_ids)
    assert core.stats().num_preemptions >= 1
    assert sorted(seen) == ["a", "b"]


def test_unschedulable_request_is_aborted_instead_of_spinning() -> None:
    core = EngineCore(_profile(num_gpu_blocks=2))
    core.add_request(_req("huge", tuple(range(20)), max_tokens=1))  # needs 5 blocks of 4, 2 exist
    res = core.step(0.0)
    assert res.outputs == (RequestOutput("huge", (), "abort"),) and res.duration_s == 0.0
    assert not core.has_work()


def test_request_validation() -> None:
    core = EngineCore(_profile())
    core.add_request(_req("x", (1,), 1))
    with pytest.raises(ValueError, match="duplicate"):
        core.add_request(_req("x", (1,), 1))
    with pytest.raises(ValueError, match="empty"):
        core.add_request(_req("y", (), 1))
    with pytest.raises(ValueError, match="max_tokens"):
        core.add_request(_req("z", (1,), 0))
    with pytest.raises(ValueError, match="not loaded"):
        core.add_request(_req("w", (1,), 1, adapter="nope"))


def test_max_model_len_ends_with_length() -> None:
    core = EngineCore(_profile(num_gpu_blocks=100, max_model_len=12))
    core.add_request(_req("r", tuple(range(10)), max_tokens=100))
    outs = [o for _ in range(5) for o in core.step(0.0).outputs]
    assert [o.finished for o in outs] == [None, "length"]


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    def run(seed: int) -> list[tuple[str, tuple[int, ...], str | None, float]]:
        core = EngineCore(_profile(num_gpu_blocks=50), seed=seed, eos_probability=0.1)
        for i in range(4):
            core.add_request(
                SimRequest(f"q{i}", tuple(range(i, i + 7)), 30, 0.0, stop_token_ids=(0,))
            )
        log: list[tuple[str, tuple[int, ...], str | None, float]] = []
        for _ in range(500):
            if not core.has_work():
                return log
            res = core.step(0.0)
            log += [
                (o.request_id, o.new_token_ids, o.finished, res.duration_s) for o in res.outputs
            ]
        raise AssertionError("did not finish")

    one, two, other = run(7), run(7), run(8)
    assert one == two
    assert [x[1] for x in one] != [x[1] for x in other]
    assert {x[2] for x in one} == {None, "stop", "length"}


def test_eos_draw_and_ignore_eos() -> None:
    core = EngineCore(_profile(vocab_size=20), eos_probability=1.0)
    core.add_request(SimRequest("stops", (5, 6), 10, 0.0, stop_token_ids=(2, 3)))
    core.add_request(SimRequest("ignores", (5, 6), 3, 0.0, ignore_eos=True, stop_token_ids=(2,)))
    outs = [o for _ in range(5) for o in core.step(0.0).outputs]
    assert outs[0] == RequestOutput("stops", (2,), "stop", 0, True)
    ignored = [o for o in outs if o.request_id == "ignores"]
    assert [o.finished for o in ignored] == [None, None, "length"]
    assert all(o.new_token_ids[0] != 2 for o in ignored)


def test_random_draws_never_hit_stop_ids() -> None:
    core = EngineCore(_profile(vocab_size=20, num_gpu_blocks=100), eos_probability=0.0)
    core.add_request(SimRequest("r", (1,), 40, 0.0, stop_token_ids=tuple(range(19))))
    outs = [o for _ in range(50) for o in core.step(0.0).outputs]
    assert [o.new_token_ids for o in outs] == [(19,)] * 40
    assert outs[-1].finished == "length"
