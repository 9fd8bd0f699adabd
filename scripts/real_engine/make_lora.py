"""Create a random (untrained) LoRA adapter for the converted SmolLM2 model.

peft's ``init_lora_weights=False`` initialises both A and B randomly, so the adapter changes
the model's output without any training; r=8 on q_proj/v_proj matches the engine's
``--max-lora-rank 8``. Run with the real-engine venv's python (scripts/real_engine_setup.sh).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "v_proj")


def make_lora(
    base: Path, out: Path, *, seed: int = 0, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> None:
    """Write a random rank-8 adapter for ``base`` into ``out`` (adapter_config + safetensors);
    ``seed`` fixes its weights, ``targets`` the projections it adapts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names"
    )
    args = parser.parse_args()
    targets = tuple(t for t in args.targets.split(",") if t)
    make_lora(args.base, args.out, seed=args.seed, targets=targets)
    print(f"wrote {sorted(p.name for p in args.out.iterdir())}")


if __name__ == "__main__":
    main()
