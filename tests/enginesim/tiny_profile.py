"""The small exact-arithmetic profile the core's unit tests start from (powers of two)."""

from __future__ import annotations

from dataclasses import replace

from enginesim.core.profile import EngineProfile


def tiny_profile(**overrides: object) -> EngineProfile:
    """4-token blocks, 16 blocks, step time c0=0.5 + 0.25/prefill token + 0.125/decode + ...

    Example: ``tiny_profile(num_gpu_blocks=6)``.
    """
    base = EngineProfile(
        name="test",
        model="m",
        block_size=4,
        num_gpu_blocks=16,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=256,
        c0_s=0.5,
        c_prefill_s=0.25,
        c_attn_s=2.0**-7,
        c_decode_s=0.125,
        c_ctx_s=2.0**-9,
        vocab_size=1000,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]
