"""Per-request routing overhead of the gateway: ``Router.route`` + ``Routed.committed``.

What the gateway adds to a request before (and right after) it is proxied, measured
in-process with ``time.perf_counter_ns`` on the real objects the app uses (no I/O): endpoint
snapshots, prompt hashing (:mod:`gateway.prefix`), prefix-index lookup, VTC admission,
``Policy.choose`` and metrics, then the index insert on commit. Cases: policy
(round-robin as the floor, prefix-cache), prompt size, block mode (bytes; tokens with a local
``tokenizer.json``), endpoint count, with the index pre-filled to ``--fill`` pairs.

A second table times tokenisation inline vs in a worker thread (``anyio.to_thread``) per
prompt size: the basis of ``routing.prefix.thread_above_chars``.

    python -m benchmarks.gateway_overhead [--reps 500] [--fill 200000] [--tokenizer PATH]

Prints tables and writes JSON to ``results/gateway-overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from gateway.endpoints import EndpointRegistry, ModelCard
from gateway.metrics import GatewayMetrics
from gateway.parsing import Kind, parse_request
from gateway.prefix import chatml, load_encoder
from gateway.router import Router
from gateway.settings import Settings
from kvcache import hash_token_blocks

MODEL = "llama3-8b"
SMOLLM2 = Path.home() / ".cache/switchyard/real-engine/models/smollm2-135m-instruct-hf"


@dataclass(frozen=True, slots=True)
class Row:
    policy: str
    mode: str
    prompt_chars: int
    endpoints: int
    blocks: int
    route_p50_us: float
    route_p99_us: float
    commit_p50_us: float
    total_p50_us: float


@dataclass(frozen=True, slots=True)
class TokRow:
    prompt_chars: int
    tokens: int
    inline_p50_us: float
    thread_p50_us: float


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _words(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def _router(n_endpoints: int, fill: int, prefix: dict[str, Any], rng: random.Random) -> Router:
    settings = Settings.model_validate({"routing": {"policy": "prefix-cache", "prefix": prefix}})
    registry = EndpointRegistry()
    for i in range(n_endpoints):
        state = registry.add(f"http://10.0.0.{i}:8000", endpoint_id=f"e{i}")
        state.record_probe(True, fail_threshold=1, success_threshold=1)
        state.set_models([ModelCard(MODEL)])
    router = Router(settings, registry, GatewayMetrics.create(registry))
    while router.index.stats().pairs < fill:
        ids = [rng.randrange(50_000) for _ in range(16 * 64)]
        router.index.insert(
            f"e{rng.randrange(n_endpoints)}", hash_token_blocks(ids, 16, model=MODEL)
        )
    return router


async def _case(
    policy_name: str, mode: str, chars: int, n_endpoints: int, *, reps: int, fill: int,
    tokenizer: Path | None,
) -> Row:  # fmt: skip
    rng = random.Random(chars * 7 + n_endpoints)
    prefix: dict[str, Any] = {"tokenizer": str(tokenizer)} if mode == "tokens" else {}
    prefix["thread_above_chars"] = 10**9  # inline: the thread hop is timed separately
    router = _router(n_endpoints, fill, prefix, rng)
    policy = router.policy(policy_name)
    # Half the requests share a system prompt (hits), half are unique (cold).
    system = _words(rng, chars // 2)
    bodies = []
    for i in range(64):
        head = system if i % 2 == 0 else _words(rng, chars // 2)
        messages = [{"role": "system", "content": head},
                    {"role": "user", "content": _words(rng, chars - chars // 2)}]  # fmt: skip
        body = json.dumps({"model": MODEL, "messages": messages, "user": f"u{i % 8}"}).encode()
        bodies.append(parse_request(body, Kind.CHAT))
    route_us: list[float] = []
    commit_us: list[float] = []
    blocks = 0
    for i in range(reps):
        fields = bodies[i % len(bodies)]
        t0 = time.perf_counter_ns()
        routed = await router.route(Kind.CHAT, fields, model=MODEL, adapter=None, policy=policy)
        t1 = time.perf_counter_ns()
        routed.committed(routed.decision.ranked[0].id, 200)
        t2 = time.perf_counter_ns()
        router.vtc.release(fields.user or "")
        route_us.append((t1 - t0) / 1e3)
        commit_us.append((t2 - t1) / 1e3)
        blocks = len(routed.blocks.hashes)
    totals = [a + b for a, b in zip(route_us, commit_us, strict=True)]
    return Row(
        policy=policy_name,
        mode=mode,
        prompt_chars=chars,
        endpoints=n_endpoints,
        blocks=blocks,
        route_p50_us=round(statistics.median(route_us), 1),
        route_p99_us=round(_p(route_us, 0.99), 1),
        commit_p50_us=round(statistics.median(commit_us), 1),
        total_p50_us=round(statistics.median(totals), 1),
    )


async def _tokenise(tokenizer: Path, chars: int, reps: int) -> TokRow:
    encoder = load_encoder(tokenizer)
    text = chatml([{"role": "user", "content": _words(random.Random(chars), chars)}])
    limiter = anyio.CapacityLimiter(2)
    inline: list[float] = []
    threaded: list[float] = []
    ids: list[int] = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        ids = encoder.encode(text, add_special_tokens=False)
        t1 = time.perf_counter_ns()
        await anyio.to_thread.run_sync(
            lambda: encoder.encode(text, add_special_tokens=False), limiter=limiter
        )
        t2 = time.perf_counter_ns()
        inline.append((t1 - t0) / 1e3)
        threaded.append((t2 - t1) / 1e3)
    return TokRow(chars, len(ids), round(statistics.median(inline), 1),
                  round(statistics.median(threaded), 1))  # fmt: skip


def _word_level_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def _table(rows: list[Any]) -> str:
    if not rows:
        return ""
    cols = list(asdict(rows[0]))
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(v) for v in asdict(r).values()) for r in rows]
    return "\n".join(lines)


async def main_async(
    args: argparse.Namespace, tokenizer: Path, tokenizer_name: str
) -> dict[str, Any]:
    rows: list[Row] = []
    for n_endpoints in (4, 16):
        for chars in (1_000, 8_000, 32_000):
            for mode in ("bytes", "tokens"):
                for policy in ("round-robin", "prefix-cache"):
                    rows.append(await _case(policy, mode, chars, n_endpoints, reps=args.reps,
                                            fill=args.fill, tokenizer=tokenizer))  # fmt: skip
    tok_rows = [
        await _tokenise(tokenizer, chars, max(20, args.reps // 20))
        for chars in (1_000, 8_000, 32_000, 128_000, 512_000)
    ]
    print(f"Router.route + committed, index filled to {args.fill} pairs ({tokenizer_name})")
    print(_table(rows))
    print("\nTokenisation inline vs worker thread")
    print(_table(tok_rows))
    return {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "tokenizer": tokenizer_name,
        "fill": args.fill,
        "reps": args.reps,
        "routing": [asdict(r) for r in rows],
        "tokenise": [asdict(r) for r in tok_rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--fill", type=int, default=200_000)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a local tokenizer.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        name = str(tokenizer) if tokenizer else ""
        if tokenizer is None and (SMOLLM2 / "tokenizer.json").is_file():
            tokenizer, name = SMOLLM2, "SmolLM2 tokenizer.json (BPE)"
        if tokenizer is None:
            tokenizer, name = _word_level_tokenizer(Path(tmp)), "word-level tokenizer (no BPE)"
        payload = asyncio.run(main_async(args, tokenizer, name))
    out = Path("results")
    out.mkdir(exist_ok=True)
    (out / "gateway-overhead.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
