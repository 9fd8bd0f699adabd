"""Start and stop engines (a real vLLM on CPU, or enginesim) for contract tests and benchmarks.

One module so that the contract suite (tests/contract), calibration and the comparison
benchmark start engines the same way: the real engine follows the verified recipe in
real-engine.md §4 (own process group, temporary ``VLLM_CACHE_ROOT``, ``/health`` polled up to
300 s, SIGTERM to the group and SIGKILL after 30 s). Usage::

    with start_vllm(RealEngineLayout.from_home(home)) as engine:
        httpx.get(engine.base_url + "/health")
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.ports import free_port

SERVED_MODEL = "smollm2"
MAX_MODEL_LEN = 2048
HEALTH_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0
DEFAULT_HOME = Path.home() / ".cache" / "switchyard" / "real-engine"
REPO_ROOT = Path(__file__).resolve().parents[2]

# real-engine.md §4: offline, no telemetry, 1 GiB of KV cache, runtime LoRA load/unload allowed.
VLLM_ENV: Mapping[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
}
VLLM_LORA_ARGS: tuple[str, ...] = (
    "--enable-lora",
    "--max-lora-rank",
    "8",
    "--max-loras",
    "2",
)


class EngineStartError(RuntimeError):
    """The engine process exited or did not become healthy in time."""


@dataclass(frozen=True, slots=True)
class RealEngineLayout:
    """Where scripts/real_engine_setup.sh put the venv, the model and the LoRA adapter."""

    home: Path
    python: Path
    model_dir: Path
    lora_dir: Path

    @classmethod
    def from_home(cls, home: Path) -> RealEngineLayout:
        home = home.expanduser().resolve()
        return cls(
            home=home,
            python=home / "venv" / "bin" / "python",
            model_dir=home / "models" / "smollm2-135m-instruct-hf",
            lora_dir=home / "models" / "lora-random",
        )

    def missing(self) -> list[Path]:
        """Paths the real engine needs that do not exist (empty when set up)."""
        needed = (self.python, self.model_dir / "config.json", self.lora_dir)
        return [p for p in needed if not p.exists()]

    @property
    def tokenizer(self) -> Path:
        return self.model_dir / "tokenizer.json"

    def enginesim_tokenizer(self) -> Path | None:
        """What enginesim's ``--tokenizer`` gets: the converted model directory, when it holds
        SmolLM2's ``tokenizer.json`` (token counts then match vLLM exactly), else None."""
        return self.model_dir if self.tokenizer.is_file() else None


@dataclass(frozen=True, slots=True)
class RunningEngine:
    """A started engine: where to reach it and what it serves."""

    kind: str
    base_url: str
    model: str
    model_root: str
    pid: int
    log_path: Path


def _tail(path: Path, *, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _wait_healthy(
    proc: subprocess.Popen[bytes], base_url: str, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EngineStartError(
                    f"engine exited with {proc.returncode} before /health; log {log_path}:\n"
                    + _tail(log_path)
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(base_url + "/health").status_code == 200:
                    return
            time.sleep(1.0)
    raise EngineStartError(
        f"/health not 200 within {timeout_s:.0f} s; log {log_path}:\n" + _tail(log_path)
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the engine's own process group, SIGKILL it after STOP_GRACE_S."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_GRACE_S)


@contextlib.contextmanager
def _run(
    kind: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    port: int,
    model_root: str,
    workdir: Path,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[RunningEngine]:
    log_path = workdir / f"{kind}.log"
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: teardown signals only this engine
            cwd=workdir,
            preexec_fn=preexec_fn,  # e.g. tests.processes.die_with_parent
        )
    try:
        _wait_healthy(proc, base_url, log_path, HEALTH_TIMEOUT_S)
        yield RunningEngine(
            kind=kind,
            base_url=base_url,
            model=SERVED_MODEL,
            model_root=model_root,
            pid=proc.pid,
            log_path=log_path,
        )
    finally:
        _stop(proc)


@contextlib.contextmanager
def start_vllm(
    layout: RealEngineLayout,
    *,
    enable_lora: bool = True,
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[RunningEngine]:
    """Start ``vllm.entrypoints.openai.api_server`` from the real-engine venv (eager mode).

    ``preexec_fn`` runs in the child before exec (tests pass ``die_with_parent``)."""
    missing = layout.missing()
    if missing:
        raise EngineStartError(
            "real engine not installed (missing "
            + ", ".join(map(str, missing))
            + "); run `make test-engine` or "
            + "`REAL_ENGINE_HOME=... bash scripts/real_engine_setup.sh`"
        )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="switchyard-vllm-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, **VLLM_ENV, "VLLM_CACHE_ROOT": str(workdir / "vllm-cache")}
        env.update(extra_env or {})
        argv = [
            str(layout.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(layout.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            SERVED_MODEL,
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--dtype",
            "bfloat16",
            "--enforce-eager",
            *(VLLM_LORA_ARGS if enable_lora else ()),
            *extra_args,
        ]
        with _run(
            "vllm",
            argv,
            env=env,
            port=port,
            model_root=str(layout.model_dir),
            workdir=workdir,
            preexec_fn=preexec_fn,
        ) as engine:
            yield engine


@contextlib.contextmanager
def start_enginesim(
    *,
    profile: str = "cpu-smollm2",
    python: Path | None = None,
    tokenizer: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[RunningEngine]:
    """Start ``python -m enginesim`` (one engine) from the repository venv.

    ``tokenizer``: the real model's directory (``RealEngineLayout.enginesim_tokenizer()``) or its
    ``tokenizer.json``, passed as ``--tokenizer`` so token counts match vLLM exactly (without it
    enginesim uses its file-free hash tokenizer; a path that does not exist makes it exit).
    """
    interpreter = python or Path(sys.executable)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="switchyard-enginesim-") as tmp:
        argv = [
            str(interpreter),
            "-m",
            "enginesim",
            "--engines",
            "1",
            "--base-port",
            str(port),
            "--profile",
            profile,
            "--model",
            SERVED_MODEL,
            *(("--tokenizer", str(tokenizer)) if tokenizer else ()),
            *extra_args,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with _run(
            "enginesim", argv, env=env, port=port, model_root=SERVED_MODEL, workdir=Path(tmp)
        ) as engine:
            yield engine
