"""Fixtures for the engine contract suite: one real vLLM engine and one enginesim, same tests.

``engine`` is parametrised over ``["vllm", "enginesim"]`` with session scope, so each engine
starts once per test session and pytest runs every contract test against one, then the other
(only one engine is alive at a time: this box has 2 shared cores).

The real engine comes from ``scripts/real_engine_setup.sh`` (``make test-engine`` runs it
first). When it is missing the ``vllm`` parameter FAILS rather than skips: a contract suite
that silently stops checking the simulator against reality is worse than a red build.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.engine.launch import (
    DEFAULT_HOME,
    REPO_ROOT,
    EngineStartError,
    RealEngineLayout,
    RunningEngine,
    start_enginesim,
    start_vllm,
)

ENGINE_KINDS = ("vllm", "enginesim")
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything in this directory needs an engine process: mark it ``real_engine``."""
    del config
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.real_engine)


@dataclass(frozen=True, slots=True)
class ContractEngine:
    """A running engine plus what the contract tests need to know about it."""

    kind: str
    base_url: str
    model: str
    model_root: str
    lora_path: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(120.0, connect=5.0))


def _real_engine_home() -> Path:
    # Test entry point: the one place the suite reads the environment (set by the Makefile).
    return Path(os.environ.get("REAL_ENGINE_HOME") or DEFAULT_HOME)


def _stub_lora(tmp: Path) -> Path:
    """A peft-style adapter directory (config only) for enginesim when vLLM is not installed."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
    }
    (tmp / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp


def _contract(running: RunningEngine, lora_path: Path) -> ContractEngine:
    return ContractEngine(
        kind=running.kind,
        base_url=running.base_url,
        model=running.model,
        model_root=running.model_root,
        lora_path=str(lora_path.resolve()),
    )


@pytest.fixture(scope="session", params=ENGINE_KINDS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContractEngine]:
    """A healthy engine on 127.0.0.1, started once per session per kind."""
    layout = RealEngineLayout.from_home(_real_engine_home())
    kind: str = request.param
    failure: str | None = None
    try:
        if kind == "vllm":
            with start_vllm(layout) as running:
                yield _contract(running, layout.lora_dir)
        else:
            lora = layout.lora_dir if layout.lora_dir.exists() else None
            lora = lora or _stub_lora(tmp_path_factory.mktemp("lora") / "lora-random")
            venv_python = REPO_ROOT / ".venv" / "bin" / "python"
            python = venv_python if venv_python.exists() else Path(sys.executable)
            # `--tokenizer <converted model dir>` when installed, so token counts are vLLM's.
            tokenizer = layout.enginesim_tokenizer()
            with start_enginesim(python=python, tokenizer=tokenizer) as running:
                yield _contract(running, lora)
    except EngineStartError as exc:
        failure = f"{kind} engine did not start: {exc}"
    if failure is not None:
        pytest.fail(failure, pytrace=False)


@pytest.fixture
def http(engine: ContractEngine) -> Iterator[httpx.Client]:
    """An httpx client on the engine (closed after the test)."""
    with engine.client() as client:
        yield client


@pytest.fixture
def sdk(engine: ContractEngine) -> Iterator[openai.OpenAI]:
    """The openai SDK on the engine: 120 s timeout, no retries (a retry would hide a failure)."""
    client = openai.OpenAI(
        base_url=engine.base_url + "/v1", api_key="unused", timeout=120.0, max_retries=0
    )
    try:
        yield client
    finally:
        client.close()
