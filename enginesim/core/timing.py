"""Step-time model: how long one forward step of a continuous batch takes.

For a step that computes prefill chunks ``(n_i tokens starting at context offset s_i)`` and
``D`` decodes with contexts ``ctx_j`` (tokens attended, including the new one)::

    t = c0 + c_prefill * sum(n_i) + c_attn * sum(n_i * (s_i + n_i / 2))
           + c_decode * D + c_ctx * sum(ctx_j)

plus, when the step runs any LoRA adapter, ``c_lora_step + c_lora_token * L + c_lora_quad *
L**2 / 2`` where ``L`` is the number of tokens computed for adapter requests in the step
(LoRA's extra matmuls). The quadratic term is 0 except on CPU, where vLLM's LoRA prefill was
measured to grow faster than linearly with the adapter tokens of a step (docs/enginesim.md §2).

``c0`` is the per-step cost (weights read once per step), ``c_prefill`` the dense compute per
prefill token (2 * params FLOPs), ``c_attn`` causal attention over the chunk (each of the
``n`` tokens attends on average ``s + n/2`` earlier tokens), ``c_decode`` the per-sequence
cost of a decode and ``c_ctx`` reading a sequence's KV cache.  Compute and memory terms are
*added* (no overlap), an upper bound of the roofline ``max`` that lands between roofline and
the 1.5-2x-roofline ITLs real engines show (docs/enginesim.md).

LoRA swap-in time is added by the engine on top of this.
"""

from __future__ import annotations

from dataclasses import dataclass

from enginesim.core.profile import EngineProfile

__all__ = ["BatchShape", "step_time"]


@dataclass(slots=True)
class BatchShape:
    """Accumulates what one step computes; cheap to fill in O(batch).

    Example: ``b = BatchShape(); b.add_prefill(128, 0); b.add_decode(300); step_time(p, b)``.
    """

    prefill_tokens: int = 0
    attn_sum: float = 0.0
    num_decodes: int = 0
    ctx_sum: int = 0
    lora_tokens: int = 0

    def add_prefill(self, n: int, start: int) -> None:
        """A prefill chunk of ``n`` tokens whose first token sits at context offset ``start``."""
        self.prefill_tokens += n
        self.attn_sum += n * (start + n / 2)

    def add_decode(self, ctx: int) -> None:
        """One decode attending ``ctx`` tokens (its own included)."""
        self.num_decodes += 1
        self.ctx_sum += ctx

    @property
    def empty(self) -> bool:
        return self.prefill_tokens == 0 and self.num_decodes == 0


def step_time(profile: EngineProfile, batch: BatchShape) -> float:
    """Simulated seconds of one forward step of ``batch`` (0 for an empty batch)."""
    if batch.empty:
        return 0.0
    return (
        profile.c0_s
        + profile.c_prefill_s * batch.prefill_tokens
        + profile.c_attn_s * batch.attn_sum
        + profile.c_decode_s * batch.num_decodes
        + profile.c_ctx_s * batch.ctx_sum
        + (
            profile.c_lora_step_s
            + profile.c_lora_token_s * batch.lora_tokens
            + profile.c_lora_quad_s * batch.lora_tokens * batch.lora_tokens / 2
            if batch.lora_tokens
            else 0.0
        )
    )
