"""The regimes of issue 10's overhead benchmark and the run presets (full, ``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from benchmarks.overhead.load import Script

CHAT = Script("chat.lua")
STREAM64 = Script("stream.lua", (("WRK_TOKENS", "64"),))
PROMPTS = Script("bodies.lua")  # WRK_BODIES is added by the runner
SWEEP = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, slots=True)
class Regime:
    key: str
    title: str
    delay_ms: float
    concurrency: tuple[int, ...]
    script: Script
    tokens: int = 16
    itl_ms: float = 1.0
    extra: tuple[str, ...] = ()  # contenders only this regime adds
    exclude: tuple[str, ...] = ()  # contenders this regime leaves out
    ttft: bool = False  # also TTFT at c=1 on a reused connection
    target: str = ""


REGIMES: dict[str, Regime] = {
    r.key: r
    for r in (
        Regime(
            "a",
            "c=1, 16 ms engines: added p50 vs direct-1",
            16,
            (1,),
            CHAT,
            target="added p50 vs direct-1",
        ),
        Regime("b", "c=32, 16 ms engines", 16, (32,), CHAT, target="req/s x direct, p50/p99"),
        Regime(
            "c",
            "c=32, zero-delay engines (CPU-bound)",
            0,
            (32,),
            CHAT,
            target="req/s and proxy CPU per request",
        ),
        Regime(
            "d",
            "streaming 64 tokens at 1 ms/token, c=32",
            0,
            (32,),
            STREAM64,
            tokens=64,
            ttft=True,
            target="req/s x direct, CPU/req; TTFT c=1 (requests 2..K)",
        ),
        Regime(
            "e",
            "8k-token prompts (shared prefix per group), c=32, 16 ms",
            16,
            (32,),
            PROMPTS,
            extra=("switchyard-prefix-cache",),
            target="prefix-cache costs <= 10 % of round-robin's req/s",
        ),
        Regime(
            "f",
            "concurrency sweep, zero-delay engines",
            0,
            SWEEP,
            CHAT,
            exclude=("litellm",),
            target="Switchyard CPU/req within +-20 % across c",
        ),
    )  # fmt: skip
}
SOAK_KEY = "g"  # 100k requests through Switchyard with RSS sampled every second


@dataclass(frozen=True, slots=True)
class Preset:
    rounds: int
    duration_s: float
    warmup_s: float
    ttft_k: int
    soak_requests: int
    soak_warmup: int
    soak_segment_s: float
    sweep: tuple[int, ...] = SWEEP


FULL = Preset(rounds=5, duration_s=10, warmup_s=2, ttft_k=50, soak_requests=100_000,
              soak_warmup=10_000, soak_segment_s=5)  # fmt: skip
QUICK = Preset(rounds=1, duration_s=2, warmup_s=1, ttft_k=8, soak_requests=10_000,
               soak_warmup=2_000, soak_segment_s=2, sweep=(8, 32, 128))  # fmt: skip


def with_sweep(regime: Regime, preset: Preset) -> Regime:
    return replace(regime, concurrency=preset.sweep) if regime.key == "f" else regime
