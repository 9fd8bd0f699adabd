"""Measure Llama-3-8B-shaped forward steps on a real GPU and compare with an enginesim profile.

Not part of CI (it needs a CUDA GPU and PyTorch). It checks the *timing model* of the GPU
profiles (``enginesim/profiles/llama3-8b-*.json``) against the kernel time of the same
shapes on hardware: random bf16 weights with Llama-3-8B's dimensions (32 layers, hidden 4096,
32 query / 8 KV heads of 128, MLP 14336, vocab 128256), PyTorch GEMMs and
``scaled_dot_product_attention``. Decode steps run inside a CUDA graph (as vLLM does), so
launch overhead is excluded; prefill runs eagerly (large kernels). What this does *not*
include: vLLM's scheduler/sampler/paged-attention overheads, so measured times are a lower
bound of a real vLLM step. RMSNorm, RoPE and activation kernels are included in simplified
form (elementwise ops of the right sizes).

    python -m benchmarks.engine.gpu_step --profile llama3-8b-h100 --out results/gpu_step.json

Prints a table (case, measured ms, profile ms, profile/measured) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256


def _build(torch: Any) -> dict[str, Any]:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape: int) -> Any:
        return (torch.randn(*shape, device=dev, dtype=dt, generator=g) * 0.02).contiguous()

    layers = [
        {
            "qkv": w(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
            "o": w(HEADS * HEAD_DIM, HIDDEN),
            "gate_up": w(HIDDEN, 2 * MLP),
            "down": w(MLP, HIDDEN),
        }
        for _ in range(LAYERS)
    ]
    return {"layers": layers, "lm_head": w(HIDDEN, VOCAB)}


def _with_cache(torch: Any, m: dict[str, Any], batch: int, ctx: int) -> dict[str, Any]:
    """The model plus a KV cache sized for ``batch`` sequences of ``ctx`` tokens."""
    shape = (LAYERS, 2, batch, KV_HEADS, ctx, HEAD_DIM)
    m.pop("kv", None)
    torch.cuda.empty_cache()
    return {**m, "kv": torch.zeros(shape, device="cuda", dtype=torch.bfloat16)}


def _forward(torch: Any, m: dict[str, Any], x: Any, ctx: int, prefill: bool) -> Any:
    """One step: x is [B, T, HIDDEN]; attends ``ctx`` cached tokens (+ T new, causal)."""
    f = torch.nn.functional
    b, t, _ = x.shape
    for i, lw in enumerate(m["layers"]):
        h = f.rms_norm(x, (HIDDEN,))
        qkv = h @ lw["qkv"]
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = q.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = k.view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v.view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        cache = m["kv"][i]
        cache[0, :b, :, ctx : ctx + t].copy_(k)
        cache[1, :b, :, ctx : ctx + t].copy_(v)
        keys = cache[0, :b, :, : ctx + t]
        vals = cache[1, :b, :, : ctx + t]
        a = f.scaled_dot_product_attention(
            q, keys, vals, is_causal=prefill and ctx == 0, enable_gqa=True
        )
        x = x + a.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM) @ lw["o"]
        h = f.rms_norm(x, (HIDDEN,))
        gate, up = (h @ lw["gate_up"]).chunk(2, dim=-1)
        x = x + (f.silu(gate) * up) @ lw["down"]
    return f.rms_norm(x[:, -1:], (HIDDEN,)) @ m["lm_head"]


def _time(torch: Any, fn: Any, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / reps / 1000.0


def _measure_prefill(torch: Any, m: dict[str, Any], n: int) -> float:
    x = torch.randn(1, n, HIDDEN, device="cuda", dtype=torch.bfloat16)
    m = _with_cache(torch, m, 1, n)
    with torch.inference_mode():
        return _time(torch, lambda: _forward(torch, m, x, 0, True), reps=5)


def _measure_decode(torch: Any, m: dict[str, Any], batch: int, ctx: int) -> float:
    x = torch.randn(batch, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    m = _with_cache(torch, m, batch, ctx)
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                _forward(torch, m, x, ctx - 1, False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _forward(torch, m, x, ctx - 1, False)
        return _time(torch, graph.replay, reps=20)


def main(argv: list[str] | None = None) -> int:
    import torch

    from enginesim.core.profile import load_profile
    from enginesim.core.timing import BatchShape, step_time

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--profile", default="llama3-8b-h100")
    p.add_argument("--out", type=Path, default=Path("results/gpu_step.json"))
    args = p.parse_args(argv)
    profile = load_profile(args.profile)
    prefills = (128, 512, 1024, 2048, 4096)
    decodes = ((1, 1024), (8, 1024), (32, 1024), (64, 2048), (128, 1024))
    model = _build(torch)
    rows: list[dict[str, Any]] = []
    for n in prefills:
        shape = BatchShape()
        shape.add_prefill(n, 0)
        rows.append(
            {
                "case": f"prefill {n}",
                "measured_s": _measure_prefill(torch, model, n),
                "profile_s": step_time(profile, shape),
            }  # fmt: skip
        )
    for batch, ctx in decodes:
        shape = BatchShape()
        for _ in range(batch):
            shape.add_decode(ctx)
        rows.append(
            {
                "case": f"decode b={batch} ctx={ctx}",
                "measured_s": _measure_decode(torch, model, batch, ctx),
                "profile_s": step_time(profile, shape),
            }  # fmt: skip
        )
    print(f"{'case':<24}{'measured ms':>12}{'profile ms':>12}{'profile/meas':>14}")
    for r in rows:
        r["ratio"] = r["profile_s"] / r["measured_s"]
        print(
            f"{r['case']:<24}{r['measured_s'] * 1e3:>12.2f}{r['profile_s'] * 1e3:>12.2f}"
            f"{r['ratio']:>14.2f}"
        )
    meta = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "profile": args.profile,
        "method": "random-weight Llama-3-8B shapes, bf16, SDPA; decode in CUDA graphs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
