"""Seeded workload generators for the routing benchmark.

Every workload is a list of :class:`BenchRequest` in arrival order with arrival offsets from
an open-loop Poisson process (exponential gaps at ``rate`` requests per simulated second), so
every contender replays exactly the same prompts at the same times.

* ``shared-prefix`` -- ``groups`` x ``per_group`` requests; each group shares a long system
  prompt, each request adds its own question (after the llm-d shared-prefix benchmark:
  150 groups x 5, 6,000-token system prompts). Requests of all groups are shuffled together.
* ``shared-prefix-zipf`` -- the same requests in total, but group popularity follows Zipf's
  law (group k gets a share ~ 1/(k+1)^``zipf_s``; at 1.0 the hottest of 16 groups sends 28 %
  of the traffic, more than a fair quarter of four engines): real system prompts are not
  equally popular, and a router must replicate a hot prefix instead of piling onto its
  first engine.
* ``multi-turn`` -- chat sessions in the production-stack multi-round QA shape: the system
  message is a system prompt shared by every session (``shared_system_words``) followed by
  the session's own history (``session_system_words``); turn k repeats the whole
  conversation so far (system message, earlier user turns and assistant replies) plus a new
  user message. A turn may only be sent after the previous turn of its session finished
  plus a think time (``depends_on``). Assistant replies are synthetic text fixed by the
  seed, so prompts are identical for every contender.
* ``unique`` -- prompts sharing nothing: measures pure load balancing (no cache to exploit).
* ``mix`` -- the three above interleaved at equal request shares.

Sizes are given in *words* from a fixed pseudo-word vocabulary; how many tokens a word
becomes depends on the engine's tokenizer, so reports use engine-reported token counts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

__all__ = ["BenchRequest", "PseudoWords", "WorkloadSpec", "generate", "WORKLOADS"]

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "po", "da", "fe", "gu", "hi")


def _vocab(rng: random.Random, n: int = 2048) -> list[str]:
    # 14 + 14**2 + 14**3 = 2954 distinct words exist; n must stay below that.
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a workload. ``at_s`` is the simulated arrival offset."""

    idx: int
    at_s: float
    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    kind: str
    group: str
    user: str | None = None
    session: str | None = None
    depends_on: int | None = None
    think_s: float = 0.0

    def prompt_text(self) -> str:
        """The concatenated message contents (what byte-block hashing and oracles look at)."""
        return "\n".join(content for _, content in self.messages)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Sizes of every workload kind; :data:`WORKLOADS` holds the quick and full presets."""

    groups: int = 150
    per_group: int = 5
    zipf_s: float = 1.0
    """Group popularity exponent of ``shared-prefix-zipf``."""
    system_words: int = 5800
    question_words: int = 1000
    shared_output: int = 1000
    sessions: int = 60
    turns: int = 5
    shared_system_words: int = 1000
    session_system_words: int = 1000
    turn_words: int = 200
    reply_words: int = 200
    turn_output: int = 200
    think_s: float = 2.0
    unique: int = 600
    unique_words: int = 2000
    unique_output: int = 300


WORKLOADS: dict[str, WorkloadSpec] = {
    "full": WorkloadSpec(),
    # 16 groups x ~2,000-token system prompts = ~32 k prefix tokens: 2x one quick engine's KV
    # (1,024 blocks x 16 = 16,384 tokens), half the 4-engine cluster's. 16 per group keeps
    # the cold first request of each group (1 in 16) and the warm requests that queue behind
    # the cold-start burst (the first ~20 arrivals are mostly new groups) out of TTFT p90.
    # Multi-turn: 64 sessions x 8 turns; a 400-word system prompt shared by all sessions plus
    # 300 words of the session's own history (production-stack's shared system prompt + user
    # history), growing to ~2,200 tokens. First turns (1 in 8) can only reuse the shared
    # part. 64 sessions keep enough in flight to drive the cluster to saturation (30 capped
    # the load below the knee: the probe never found one).
    "quick": WorkloadSpec(
        groups=16,
        per_group=16,
        system_words=2000,
        question_words=200,
        shared_output=64,
        sessions=64,
        turns=8,
        shared_system_words=400,
        session_system_words=300,
        turn_words=100,
        reply_words=100,
        turn_output=64,
        think_s=0.5,
        unique=150,
        unique_words=1200,
        unique_output=64,
    ),
}


class PseudoWords:
    """Pseudo-words drawn from ``rng``: ``PseudoWords(random.Random(0)).words(5)``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.vocab = _vocab(rng)

    def words(self, n: int) -> str:
        return " ".join(self.rng.choices(self.vocab, k=n))


def group_sizes(groups: int, total: int, zipf_s: float) -> list[int]:
    """``total`` requests over ``groups`` with shares ~ 1/(k+1)^zipf_s, at least one each
    (largest remainders; 0.0 gives equal sizes)."""
    if groups <= 0 or total < groups:
        raise ValueError("need at least one request per group")
    weights = [1.0 / (k + 1) ** zipf_s for k in range(groups)]
    spare, total_weight = total - groups, sum(weights)
    exact = [spare * w / total_weight for w in weights]
    sizes = [1 + int(x) for x in exact]
    by_remainder = sorted(range(groups), key=lambda k: (int(exact[k]) - exact[k], k))
    for k in by_remainder[: total - sum(sizes)]:
        sizes[k] += 1
    return sizes


def _shared_prefix(
    spec: WorkloadSpec, text: PseudoWords, zipf_s: float = 0.0
) -> list[BenchRequest]:
    out: list[BenchRequest] = []
    sizes = group_sizes(spec.groups, spec.groups * spec.per_group, zipf_s)
    for g in range(spec.groups):
        system = f"[group {g}] " + text.words(spec.system_words)
        for q in range(sizes[g]):
            question = text.words(spec.question_words)
            out.append(
                BenchRequest(
                    idx=0,
                    at_s=0.0,
                    messages=(("system", system), ("user", question)),
                    max_tokens=spec.shared_output,
                    kind="shared-prefix",
                    group=f"g{g}",
                    user=f"user-g{g}-{q}",
                )
            )
    text.rng.shuffle(out)
    return out


def _multi_turn(spec: WorkloadSpec, text: PseudoWords) -> list[list[BenchRequest]]:
    sessions: list[list[BenchRequest]] = []
    shared = text.words(spec.shared_system_words) + " " if spec.shared_system_words else ""
    for s in range(spec.sessions):
        history: list[tuple[str, str]] = [
            ("system", shared + f"[session {s}] " + text.words(spec.session_system_words))
        ]
        turns: list[BenchRequest] = []
        for _ in range(spec.turns):
            history.append(("user", text.words(spec.turn_words)))
            turns.append(
                BenchRequest(
                    idx=0,
                    at_s=0.0,
                    messages=tuple(history),
                    max_tokens=spec.turn_output,
                    kind="multi-turn",
                    group=f"s{s}",
                    user=f"user-s{s}",
                    session=f"session-{s}",
                    think_s=spec.think_s,
                )
            )
            history.append(("assistant", text.words(spec.reply_words)))
        sessions.append(turns)
    return sessions


def _unique(spec: WorkloadSpec, text: PseudoWords) -> list[BenchRequest]:
    return [
        BenchRequest(
            idx=0,
            at_s=0.0,
            messages=(("user", f"[unique {u}] " + text.words(spec.unique_words)),),
            max_tokens=spec.unique_output,
            kind="unique",
            group=f"u{u}",
            user=f"user-u{u}",
        )
        for u in range(spec.unique)
    ]


def _arrivals(rng: random.Random, n: int, rate: float) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _schedule(
    streams: list[list[BenchRequest]], rate: float, rng: random.Random
) -> list[BenchRequest]:
    """Poisson starts per stream (a stream = one request, or one session's turns in order)."""
    total = sum(len(s) for s in streams)
    stream_rate = rate * len(streams) / max(1, total)
    starts = _arrivals(rng, len(streams), stream_rate)
    flat: list[tuple[float, int, int, BenchRequest]] = []
    for sid, (start, stream) in enumerate(zip(starts, streams, strict=True)):
        for k, req in enumerate(stream):
            flat.append((start + k * req.think_s, sid, k, req))
    flat.sort(key=lambda x: (x[0], x[1], x[2]))
    position = {(sid, k): i for i, (_, sid, k, _) in enumerate(flat)}
    return [
        replace(req, idx=i, at_s=at, depends_on=position[(sid, k - 1)] if k else None)
        for i, (at, sid, k, req) in enumerate(flat)
    ]


def generate(kind: str, spec: WorkloadSpec, *, rate: float, seed: int = 0) -> list[BenchRequest]:
    """The workload ``kind`` (shared-prefix, multi-turn, unique, mix) at ``rate`` req/s."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    text = PseudoWords(random.Random(f"{seed}:text"))
    arrivals = random.Random(f"{seed}:{kind}:{rate}:arrivals")
    if kind == "shared-prefix":
        streams = [[r] for r in _shared_prefix(spec, text)]
    elif kind == "shared-prefix-zipf":
        streams = [[r] for r in _shared_prefix(spec, text, spec.zipf_s)]
    elif kind == "multi-turn":
        streams = _multi_turn(spec, text)
    elif kind == "unique":
        streams = [[r] for r in _unique(spec, text)]
    elif kind == "mix":
        third = replace(
            spec,
            groups=max(1, spec.groups // 3),
            sessions=max(1, spec.sessions // 3),
            unique=max(1, spec.unique // 3),
        )
        streams = [[r] for r in _shared_prefix(third, text)]
        streams += _multi_turn(third, text)
        streams += [[r] for r in _unique(third, text)]
        arrivals.shuffle(streams)
    else:
        raise ValueError(f"unknown workload {kind!r}")
    return _schedule(streams, rate, arrivals)
