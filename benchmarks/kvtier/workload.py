"""The KV-tier benchmark's workload: long shared prefixes under open-loop arrivals.

Two request populations, generated from one seed so every contender replays the same
prompts at the same (simulated) times:

Requests arriving before ``warmup_s`` fill the caches (and the tier) and are not measured:
the targets are about the steady state, not about the first request of each document, which
every contender computes.

* **RAG groups** -- ``groups`` documents of ``doc_words`` words (a retrieved context or a
  long system prompt) with Zipf(``zipf_s``) popularity; each request is one document plus its
  own question. Poisson arrivals at ``rag_rate`` requests per simulated second.
* **Multi-turn sessions** -- ``sessions`` chats sharing a system prompt of ``system_words``
  words, each with ``history_words`` of its own; turn k resends the whole conversation plus a
  new user message (``turn_words``) and a synthetic assistant reply (``reply_words``) per
  earlier turn. Sessions start as a Poisson process at ``session_rate``; a turn is sent after
  the previous one finished plus ``think_s`` (``BenchRequest.depends_on``).

Words are pseudo-words, one token each with enginesim's hash tokenizer, so ``doc_words`` is
about the document's token count. The working set (every document and session) is sized to
exceed the engines' KV cache: without a tier, evicted prefixes are recomputed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from benchmarks.routing.workloads import BenchRequest, PseudoWords

__all__ = ["KVTierWorkload", "QUICK", "FULL", "generate", "vocabulary", "working_set_tokens"]


@dataclass(frozen=True, slots=True)
class KVTierWorkload:
    """Sizes and rates (simulated seconds) of one benchmark run."""

    duration_s: float = 120.0
    warmup_s: float = 40.0  # arrivals before this are sent but not measured (caches fill)
    groups: int = 24
    doc_words: int = 3000
    question_words: int = 60
    zipf_s: float = 0.6
    rag_rate: float = 7.0
    rag_output: int = 32
    sessions: int = 16
    session_rate: float = 0.5
    turns: int = 6
    system_words: int = 600
    history_words: int = 600
    turn_words: int = 80
    reply_words: int = 60
    turn_output: int = 32
    think_s: float = 2.0


QUICK = KVTierWorkload(duration_s=100.0)
FULL = KVTierWorkload(duration_s=300.0, sessions=48, session_rate=0.2, turns=8)


def vocabulary(seed: int = 0) -> list[str]:
    """The pseudo-words :func:`generate` draws from (for the benchmark's tokenizer)."""
    return PseudoWords(random.Random(f"kvtier:{seed}:words")).vocab


def _poisson(rng: random.Random, rate: float, until: float) -> list[float]:
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < until:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _zipf_pick(rng: random.Random, n: int, s: float) -> int:
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def generate(spec: KVTierWorkload, *, seed: int = 0) -> list[BenchRequest]:
    """The requests in arrival order; ``idx`` = position, ``depends_on`` = an earlier idx."""
    rng = random.Random(f"kvtier:{seed}")
    words = PseudoWords(random.Random(f"kvtier:{seed}:words")).words
    docs = [f"[doc {g}] " + words(spec.doc_words) for g in range(spec.groups)]
    timed: list[tuple[float, int, int, BenchRequest]] = []
    for i, at in enumerate(_poisson(rng, spec.rag_rate, spec.duration_s)):
        g = _zipf_pick(rng, spec.groups, spec.zipf_s)
        req = BenchRequest(
            idx=0,
            at_s=at,
            messages=(("system", docs[g]), ("user", words(spec.question_words))),
            max_tokens=spec.rag_output,
            kind="rag",
            group=f"g{g}",
            user=f"rag-{i}",
        )
        timed.append((at, -1, i, req))
    shared = words(spec.system_words)
    starts = _poisson(rng, spec.session_rate, spec.duration_s)[: spec.sessions]
    for s, start in enumerate(starts):
        history: list[tuple[str, str]] = [("system", f"{shared} [session {s}] " + words(
            spec.history_words))]  # fmt: skip
        for k in range(spec.turns):
            history.append(("user", words(spec.turn_words)))
            req = BenchRequest(
                idx=0,
                at_s=start + k * spec.think_s,
                messages=tuple(history),
                max_tokens=spec.turn_output,
                kind="multi-turn",
                group=f"s{s}",
                user=f"session-{s}",
                session=f"session-{s}",
                think_s=spec.think_s,
            )
            timed.append((req.at_s, s, k, req))
            history.append(("assistant", words(spec.reply_words)))
    timed.sort(key=lambda x: (x[0], x[1], x[2]))
    position = {(sid, k): i for i, (_, sid, k, _) in enumerate(timed) if sid >= 0}
    return [
        replace(req, idx=i, depends_on=position[(sid, k - 1)] if sid >= 0 and k > 0 else None)
        for i, (_, sid, k, req) in enumerate(timed)
    ]


def working_set_tokens(spec: KVTierWorkload) -> int:
    """About how many distinct prompt tokens the workload can reuse (documents + sessions)."""
    per_session = spec.history_words + spec.turns * (spec.turn_words + spec.reply_words)
    return spec.groups * spec.doc_words + spec.system_words + spec.sessions * per_session
