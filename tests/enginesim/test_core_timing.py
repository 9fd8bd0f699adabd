"""Step-time model: exact formula values for given batches, and the shipped profiles."""

from __future__ import annotations

from dataclasses import replace

import pytest

from enginesim.core.api import SimRequest
from enginesim.core.engine import EngineCore
from enginesim.core.profile import (
    available_profiles,
    load_profile,
    profile_from_dict,
)
from enginesim.core.timing import BatchShape, step_time
from tests.enginesim.tiny_profile import tiny_profile

P = tiny_profile(name="t", block_size=16, num_gpu_blocks=1000, max_num_seqs=64,
                 max_num_batched_tokens=512, max_model_len=4096, vocab_size=32000)  # fmt: skip


@pytest.mark.parametrize(
    ("prefills", "decodes", "expected"),
    [
        ((), (), 0.0),
        (((8, 0),), (), 0.5 + 8 * 0.25 + 8 * 4 * 2.0**-7),
        (((8, 16),), (), 0.5 + 8 * 0.25 + 8 * 20 * 2.0**-7),
        ((), (100,), 0.5 + 0.125 + 100 * 2.0**-9),
        ((), (100, 200, 300), 0.5 + 3 * 0.125 + 600 * 2.0**-9),
        (
            ((3, 5), (4, 0)),
            (10, 20),
            0.5 + 7 * 0.25 + (3 * 6.5 + 4 * 2) * 2.0**-7 + 0.25 + 30 / 512,
        ),
    ],
)
def test_step_time_formula(
    prefills: tuple[tuple[int, int], ...], decodes: tuple[int, ...], expected: float
) -> None:
    batch = BatchShape()
    for n, start in prefills:
        batch.add_prefill(n, start)
    for ctx in decodes:
        batch.add_decode(ctx)
    assert step_time(P, batch) == expected


def test_decode_step_grows_with_batch_and_context() -> None:
    """One engine step of B decodes at context c costs c0 + B*c_decode + B*c*c_ctx."""
    durations = {}
    for batch in (1, 4, 8):
        core = EngineCore(P)
        for i in range(batch):
            core.add_request(SimRequest(f"r{i}", tuple(range(i, i + 31)), 5, 0.0, ignore_eos=True))
        first = core.step(0.0)
        assert first.duration_s == 0.5 + batch * (31 * 0.25 + 31 * 15.5 * 2.0**-7)
        second = core.step(0.0)
        assert (second.num_prefill_tokens, second.num_decode_tokens) == (0, batch)
        durations[batch] = second.duration_s
    assert durations == {b: 0.5 + b * 0.125 + b * 32 * 2.0**-9 for b in (1, 4, 8)}


def test_prefix_hit_cuts_prefill_time() -> None:
    core = EngineCore(P)
    prompt = tuple(range(100))
    core.add_request(SimRequest("a", prompt, 1, 0.0, ignore_eos=True))
    cold = core.step(0.0).duration_s
    core.add_request(SimRequest("b", prompt, 1, 0.0, ignore_eos=True))
    warm = core.step(0.0).duration_s
    assert cold == 0.5 + 100 * 0.25 + 100 * 50 * 2.0**-7
    assert warm == 0.5 + 4 * 0.25 + 4 * (96 + 2) * 2.0**-7  # 6 blocks of 16 hit


def test_shipped_profiles_load_and_gpu_priors_match_reference() -> None:
    assert available_profiles() == [
        "cpu-smollm2",
        "llama3-8b-a100",
        "llama3-8b-a100-bench",  # benchmarks/autoscale: A100 timing, 512-token prefill chunks
        "llama3-8b-a10g",
        "llama3-8b-h100",
        "llama3-8b-l4",
    ]
    # autoscaling-and-gpus.md section 8: decode b=1 (weights read) and KV capacity.
    priors = {"a10g": (33.5, 27e3), "l4": (66.9, 27e3), "a100": (9.8, 410e3), "h100": (6.0, 410e3)}
    for gpu, (c0_ms, kv_tokens) in priors.items():
        p = load_profile(f"llama3-8b-{gpu}")
        assert p.c0_s * 1e3 == pytest.approx(c0_ms, abs=0.1)
        assert p.kv_capacity_tokens == pytest.approx(kv_tokens, rel=0.01)
        assert p.sources and p.block_size == 16
    assert load_profile("llama3-8b-h100").max_num_batched_tokens == 8192
    cpu = load_profile("cpu-smollm2")
    assert (cpu.block_size, cpu.num_gpu_blocks, cpu.kv_capacity_tokens) == (128, 364, 46592)


def test_cpu_profile_is_a_plausible_smollm2_engine() -> None:
    """Coefficients are rewritten by benchmarks/engine/calibrate.py; check only their shape."""
    p = load_profile("cpu-smollm2")
    assert p.model == "smollm2" and p.max_loras == 2
    one = p.c0_s + p.c_decode_s + 100 * p.c_ctx_s
    eight = p.c0_s + 8 * (p.c_decode_s + 100 * p.c_ctx_s)
    assert 1 / one > 20 and 8 / eight > 2.5 / one  # batching raises throughput (real: ~5x)
    assert p.c0_s + 754 * p.c_prefill_s > p.c0_s + 114 * p.c_prefill_s


def test_profile_validation_and_derivation() -> None:
    raw = {
        "name": "x",
        "model": "m",
        "block_size": 16,
        "num_gpu_blocks": 0,
        "gpu_memory_bytes": 10e9,
        "gpu_memory_utilization": 0.5,
        "weight_bytes": 1e9,
        "activation_bytes": 0.0,
        "kv_bytes_per_token": 65536,
        "max_num_seqs": 4,
        "max_num_batched_tokens": 64,
        "max_model_len": 128,
        "c0_s": 0.0,
        "c_prefill_s": 0.0,
        "c_attn_s": 0.0,
        "c_decode_s": 0.0,
        "c_ctx_s": 0.0,
    }
    assert profile_from_dict(raw).num_gpu_blocks == 3814  # 4e9 / (16 * 65536) = 3814.7
    with pytest.raises(ValueError, match="unknown profile fields: typo"):
        profile_from_dict({**raw, "typo": 1})
    with pytest.raises(ValueError, match="coefficients"):
        profile_from_dict({**raw, "c0_s": -1.0})
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_profile("no-such-profile")
    assert replace(P, c0_s=1.0).c0_s == 1.0
