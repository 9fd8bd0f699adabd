"""The processes and files of one LoRA benchmark run: the engine profile, the adapters on disk,
the enginesim engines and (for ours) the gateway.

* :func:`write_profile` -- ``llama3-8b-a100`` (vLLM's A100 priors) with ``max_loras`` 8 GPU
  slots, ``max_cpu_loras`` 16 and the adapter read bandwidth of a network volume: written as a
  JSON file that ``--profile`` takes, so enginesim's shipped profiles stay as they are.
* :func:`write_adapters` -- ``n`` peft-style adapter directories (``adapter_config.json`` plus a
  *sparse* ``adapter_model.safetensors`` of ``adapter_bytes``: enginesim charges loads and GPU
  swap-ins by file size, and a sparse file costs no disk).
* :func:`start_engines` / :func:`start_gateway` -- subprocesses in their own process groups,
  stopped by PID (``benchmarks.routing.launch``); logs under the run's directory.

Usage::

    profile = write_profile(run_dir)
    paths = write_adapters(run_dir / "adapters", 50)
    engines = start_engines(4, profile=profile, speed=4.0, log_dir=run_dir)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.lora.traces import adapter_name
from benchmarks.ports import free_port_block
from benchmarks.routing.launch import EngineCluster, Proc, spawn, start_enginesim, wait_ready
from enginesim.core.profile import PROFILE_DIR

__all__ = [
    "BASE_MODEL",
    "BenchProfile",
    "EngineCluster",
    "Proc",
    "gateway_config",
    "start_engines",
    "start_gateway",
    "write_adapters",
    "write_profile",
]

BASE_MODEL = "llama3-8b"
BASE_PROFILE = "llama3-8b-a100"


@dataclass(frozen=True, slots=True)
class BenchProfile:
    """What the benchmark changes in the base profile (documented in the README)."""

    max_loras: int = 8
    max_cpu_loras: int = 16
    # Adapter reads from a network volume / object-store cache (AIBrix pulls adapters from
    # S3-like storage): 200 MB/s, a prior. An 84 MB adapter (rank 16 on all 7 linear layers of
    # Llama-3-8B) then takes 0.42 s to load; the GPU swap-in from CPU memory stays PCIe 25 GB/s.
    lora_disk_bytes_per_s: float = 2e8
    adapter_bytes: int = 84_000_000


def write_profile(run_dir: Path, bench: BenchProfile = BenchProfile()) -> Path:
    """The engines' profile JSON (``--profile`` accepts a path)."""
    raw: dict[str, Any] = json.loads((PROFILE_DIR / f"{BASE_PROFILE}.json").read_text())
    raw.update(
        name=f"{BASE_PROFILE}-lora-bench",
        max_loras=bench.max_loras,
        max_cpu_loras=bench.max_cpu_loras,
        lora_disk_bytes_per_s=bench.lora_disk_bytes_per_s,
    )
    raw["sources"] = [*raw.get("sources", ()), "benchmarks/lora: LoRA slots and read bandwidth"]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "profile.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def write_adapters(root: Path, n: int, *, size_bytes: int = 84_000_000) -> dict[str, str]:
    """``n`` adapter directories under ``root``; returns name -> absolute path."""
    out: dict[str, str] = {}
    for i in range(n):
        name = adapter_name(i)
        d = (root / name).resolve()
        d.mkdir(parents=True, exist_ok=True)
        config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "task_type": "CAUSAL_LM",
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"]}  # fmt: skip
        (d / "adapter_config.json").write_text(json.dumps(config))
        weights = d / "adapter_model.safetensors"
        with open(weights, "wb") as fh:
            fh.truncate(size_bytes)  # sparse: apparent size only
        out[name] = str(d)
    return out


def start_engines(n: int, *, profile: Path, speed: float, log_dir: Path) -> EngineCluster:
    """``n`` enginesim engines in one process (ready immediately, no cold start)."""
    return start_enginesim(
        engines=n, profile=str(profile), speed=speed, model=BASE_MODEL, log_dir=log_dir
    )


def gateway_config(
    *,
    port: int,
    engine_urls: Mapping[str, str],
    adapters: Mapping[str, str],
    max_loras: int,
    lora: Mapping[str, Any],
    policy: str,
) -> dict[str, Any]:
    """``switchyard serve`` config: static engines, the adapters registered, ``lora`` knobs."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "routing": {"policy": policy},
        "health": {"interval_s": 0.5, "success_threshold": 1},
        # Slow-engine avoidance off, as in benchmarks/autoscale: its TTFT-EWMA test flags
        # engines on the prompt/adapter mix alone at these speeds.
        "outliers": {"slow_factor": 1e6},
        "engines": [
            {"url": u, "id": eid, "models": [BASE_MODEL]} for eid, u in engine_urls.items()
        ],
        "lora": {
            "adapters": [
                {"name": name, "base_model": BASE_MODEL, "source": path, "rank": 16}
                for name, path in adapters.items()
            ],
            "max_loras": max_loras,
            **lora,
        },
        "log_level": "WARNING",
    }


def start_gateway(config: dict[str, Any], *, log_dir: Path, timeout_s: float = 60.0) -> Proc:
    """``switchyard serve --config`` (config from :func:`gateway_config`), ready on /health."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).parent / "switchyard"
    env = {"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    proc = spawn("gateway", [str(exe), "serve", "--config", str(path)], log_dir, env=env)
    url = f"http://127.0.0.1:{config['server']['port']}"
    wait_ready(proc, [f"{url}/health"], timeout_s=timeout_s)
    return proc


def free_gateway_port() -> int:
    return free_port_block(1)
