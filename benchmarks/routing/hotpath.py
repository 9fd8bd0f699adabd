"""Hot-path cost of prefix-aware routing: hashing + index match + ``Policy.choose`` + insert.

Everything the gateway adds per request for the ``prefix-cache`` policy, measured in-process
(no I/O) with ``time.perf_counter_ns``: median and p99 microseconds per operation over many
repetitions, for several prompt sizes, both block modes (token ids with 16-token blocks;
bytes with 64-byte blocks) and 4 / 16 endpoints, with an index already holding ``--fill``
(block, endpoint) pairs. Prints a table and writes JSON to ``results/``.

    python -m benchmarks.routing.hotpath [--reps 2000] [--fill 200000]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvcache.hashing import hash_byte_blocks, hash_token_blocks
from kvcache.index import PrefixIndex
from routing.registry import builtin_policies
from routing.types import EndpointSnapshot, RouteRequest

MODEL = "llama3-8b"


@dataclass(frozen=True, slots=True)
class Row:
    case: str
    mode: str
    prompt_tokens: int
    endpoints: int
    hash_us: float
    match_us: float
    choose_us: float
    insert_us: float
    total_p50_us: float
    total_p99_us: float


def _time(fn: Callable[[], object], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fill_index(index: PrefixIndex, n_endpoints: int, pairs: int, rng: random.Random) -> None:
    while index.stats().pairs < pairs:
        chain = hash_token_blocks([rng.randrange(128_000) for _ in range(16 * 64)], 16, model=MODEL)
        index.insert(f"e{rng.randrange(n_endpoints)}", chain)


def run_case(mode: str, prompt_tokens: int, n_endpoints: int, *, reps: int, fill: int) -> Row:
    rng = random.Random(prompt_tokens * 31 + n_endpoints)
    index = PrefixIndex(max_pairs=max(fill * 2, 1000))
    _fill_index(index, n_endpoints, fill, rng)
    tokens = [rng.randrange(128_000) for _ in range(prompt_tokens)]
    text = " ".join(str(t) for t in tokens).encode()[: prompt_tokens * 4]
    if mode == "tokens":

        def do_hash() -> list[int]:
            return hash_token_blocks(tokens, 16, model=MODEL)

        block_tokens = 16
    else:

        def do_hash() -> list[int]:
            return hash_byte_blocks(text, 64, model=MODEL)

        block_tokens = 16  # 64 bytes ~ 16 tokens
    hashes = do_hash()
    half = hashes[: len(hashes) // 2]
    for i in range(min(3, n_endpoints)):  # a warm prefix on a few endpoints
        index.insert(f"e{i}", half if i else hashes)
    policy = builtin_policies()["prefix-cache"]()
    endpoints = [
        EndpointSnapshot(
            id=f"e{i}",
            url=f"http://e{i}",
            in_flight=i % 3 + 1,
            prefill_tokens=i * 100,
            recent_routed=10.0 + i,  # recent traffic: the balance term is computed too
            last_routed_seq=0,
        )
        for i in range(n_endpoints)
    ]
    matched = index.match(hashes)
    req = RouteRequest(
        model=MODEL,
        prompt_tokens=prompt_tokens,
        block_hashes=tuple(hashes),
        block_tokens=block_tokens,
        prefix_blocks=matched,
    )

    def total() -> None:
        h = do_hash()
        m = index.match(h)
        r = RouteRequest(
            model=MODEL,
            prompt_tokens=prompt_tokens,
            block_hashes=tuple(h),
            block_tokens=block_tokens,
            prefix_blocks=m,
        )
        d = policy.choose(r, endpoints)
        index.insert(d.ranked[0].id, h)

    hash_t = _time(do_hash, reps)
    match_t = _time(lambda: index.match(hashes), reps)
    choose_t = _time(lambda: policy.choose(req, endpoints), reps)
    insert_t = _time(lambda: index.insert("e0", hashes), reps)
    total_t = _time(total, reps)
    return Row(
        case=f"{mode}/{prompt_tokens}tok/{n_endpoints}ep",
        mode=mode,
        prompt_tokens=prompt_tokens,
        endpoints=n_endpoints,
        hash_us=statistics.median(hash_t),
        match_us=statistics.median(match_t),
        choose_us=statistics.median(choose_t),
        insert_us=statistics.median(insert_t),
        total_p50_us=statistics.median(total_t),
        total_p99_us=_p(total_t, 0.99),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--fill", type=int, default=200_000, help="index pairs before measuring")
    parser.add_argument("--out", type=Path, default=Path("results/routing-hotpath.json"))
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    args = parser.parse_args(argv)
    sizes = (1000, 8000) if args.quick else (256, 1000, 8000, 32000)
    fanout = (4,) if args.quick else (4, 16)
    reps = min(args.reps, 300) if args.quick else args.reps
    fill = min(args.fill, 20_000) if args.quick else args.fill
    rows = [
        run_case(mode, size, n, reps=reps, fill=fill)
        for mode in ("tokens", "bytes")
        for size in sizes
        for n in fanout
    ]
    header = (
        f"{'case':<26}{'hash':>9}{'match':>9}{'choose':>9}{'insert':>9}{'total p50':>11}"
        f"{'p99':>9}  (us)"
    )
    print(header)
    for r in rows:
        print(
            f"{r.case:<26}{r.hash_us:>9.1f}{r.match_us:>9.1f}{r.choose_us:>9.1f}"
            f"{r.insert_us:>9.1f}{r.total_p50_us:>11.1f}{r.total_p99_us:>9.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "reps": reps,
        "fill_pairs": fill,
        "unix_time": time.time(),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
