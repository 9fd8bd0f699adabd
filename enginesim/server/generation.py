"""Turning one HTTP request into core requests and text: prompts, limits, stop strings, usage.

One ``SimRequest`` per (prompt, choice); with ``--kv-tier`` a prompt is looked up in the tier
once (``tier_lookup``) and its choices share the answer. ``run_choice`` feeds a request's token
deliveries through incremental detokenisation and stop-string matching (holding back
``max(len(stop)) - 1`` characters while streaming, like vLLM) and sends ``ChoicePiece``s to a
memory stream. A request that leaves ``run_choice`` unfinished (client gone, task cancelled) is
aborted in the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from anyio.abc import ObjectSendStream

from enginesim.core.api import SimRequest
from enginesim.server.driver import ParentGroup
from enginesim.server.errors import bad_request
from enginesim.server.runtime import EngineRuntime, TextCodec

__all__ = [
    "ChoicePiece",
    "ChoiceResult",
    "GenParams",
    "IncrementalDetokenizer",
    "check_context",
    "run_choice",
    "tier_lookup",
    "usage_json",
]


@dataclass(frozen=True, slots=True)
class GenParams:
    """Sampling settings the simulator honours (others are accepted and ignored)."""

    stops: tuple[str, ...] = ()
    include_stop: bool = False
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    adapter: str | None = None
    cache_salt: str | None = None
    # Logprobs asked for: alternatives per token (chat ``top_logprobs`` / completions
    # ``logprobs``); None = no logprobs.
    logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class ChoicePiece:
    """New text for one choice; ``finish_reason`` (and ``stop_reason``) set on its last piece.

    ``token_ids``: the tokens this piece covers, at positions ``start...`` of the choice's
    output (their logprobs); ``text_start``: characters of the choice's text sent before it.
    """

    index: int
    text: str
    num_new_tokens: int
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()
    start: int = 0
    text_start: int = 0
    stop_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    index: int
    text: str
    num_tokens: int
    num_cached: int
    finish_reason: str
    token_ids: tuple[int, ...] = ()
    stop_reason: str | None = None


def check_context(rt: EngineRuntime, prompt_len: int, max_tokens: int | None) -> int:
    """vLLM 0.32's length validation; returns the effective max_tokens (may be < 1).

    ``max_tokens`` above ``max_model_len`` and a prompt longer than ``max_model_len`` are 400s;
    otherwise ``max_tokens`` is clamped to the room left (vLLM's ``get_max_tokens``), default =
    the room. A result below 1 (a prompt filling the context, ``max_tokens`` 0 or negative) is
    rejected afterwards by :func:`enginesim.server.sampling.verify_sampling`, as in vLLM.
    """
    limit = rt.spec.max_model_len
    if max_tokens is not None and max_tokens > limit:
        raise bad_request(
            f"max_tokens={max_tokens} cannot be greater than max_model_len={limit}. Please "
            "request fewer output tokens.",
            param="max_tokens",
            value=max_tokens,
        )
    if prompt_len > limit:
        shown = min(prompt_len, limit + 1)  # vLLM tokenises with truncation at limit + 1
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"contains at least {shown} input tokens, which exceeds this limit even without any "
            "output tokens. Please reduce the length of the input prompt.",
            param="input_tokens",
            value=shown,
        )
    room = limit - prompt_len
    return room if max_tokens is None else min(max_tokens, room)


class IncrementalDetokenizer:
    """vLLM's ``detokenize_incrementally``: decode only a small window of recent ids.

    Each call decodes ``ids[prefix:]`` and ``ids[prefix:read]`` and returns the difference, so
    the cost per token is O(1) instead of re-decoding the whole output; text ending in an
    incomplete UTF-8 sequence is held back until the next id completes it.
    """

    __slots__ = ("_codec", "_ids", "_prefix", "_read")

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, new_ids: tuple[int, ...]) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._codec.decode(self._ids[self._prefix : self._read])
        new_text = self._codec.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for s in stops:
        pos = text.find(s, start)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


async def tier_lookup(
    rt: EngineRuntime, prompt_ids: list[int], params: GenParams, *, choices: int
) -> int:
    """Leading prompt blocks the KV tier holds (0 without ``--kv-tier``): one lookup for a
    prompt's ``choices`` (each counts as a lookup, as vLLM's connector asks per child)."""
    if rt.tier is None:
        return 0
    return await rt.tier.lookup(
        prompt_ids, adapter=params.adapter, cache_salt=params.cache_salt, requests=choices
    )


async def run_choice(
    rt: EngineRuntime,
    *,
    request_id: str,
    index: int,
    prompt_ids: list[int],
    max_tokens: int,
    params: GenParams,
    out: ObjectSendStream[ChoicePiece],
    parent: ParentGroup | None = None,
    tier_blocks: int = 0,
) -> ChoiceResult:
    """Run one choice to its end, streaming pieces to ``out`` (``parent``: its n-group;
    ``tier_blocks``: the prompt's :func:`tier_lookup`)."""
    eos = () if params.ignore_eos else rt.spec.eos_token_ids
    req = SimRequest(
        request_id=request_id,
        prompt_token_ids=tuple(prompt_ids),
        max_tokens=max_tokens,
        arrival_time=rt.driver.now(),
        adapter=params.adapter,
        ignore_eos=params.ignore_eos,
        cache_salt=params.cache_salt,
        stop_token_ids=tuple(dict.fromkeys((*eos, *params.stop_token_ids))),
        tier_blocks=tier_blocks,
    )
    queue = rt.driver.submit(req, parent=parent)
    holdback = max((len(s) for s in params.stops), default=1) - 1
    detok = IncrementalDetokenizer(rt.codec)
    num_tokens = 0
    sent = 0
    cached = 0
    finish: str | None = None
    stop_reason: str | None = None
    text = ""
    out_ids: list[int] = []
    try:
        while finish is None:
            d = await queue.get()
            if d.error is not None:
                raise RuntimeError(d.error)
            if d.num_cached_tokens is not None:
                cached = d.num_cached_tokens
            start = num_tokens
            num_tokens += len(d.token_ids)
            out_ids.extend(d.token_ids)
            text += detok.add(d.token_ids)
            reason: str | None = d.finished
            hit = _find_stop(text, params.stops, max(0, sent - holdback)) if params.stops else None
            if hit is not None:
                pos, stop = hit
                text = text[: pos + len(stop)] if params.include_stop else text[:pos]
                if reason is None:
                    rt.driver.finish(request_id, "stop")
                reason = "stop"
                stop_reason = stop  # vLLM names the stop string that matched
            upto = len(text)
            if reason is None:
                upto -= holdback
            delta = text[sent:upto] if upto > sent else ""
            piece = ChoicePiece(
                index,
                delta,
                len(d.token_ids),
                reason,
                token_ids=d.token_ids,
                start=start,
                text_start=sent,
                stop_reason=stop_reason,
            )
            sent = max(sent, upto)
            finish = reason
            await out.send(piece)
    finally:
        if finish is None:
            rt.driver.finish(request_id, "abort")
    return ChoiceResult(index, text, num_tokens, cached, finish, tuple(out_ids), stop_reason)


def usage_json(prompt_tokens: int, results: list[ChoiceResult], *, details: bool) -> dict[str, Any]:
    """vLLM's ``UsageInfo``; the details fields exist (null) only in non-streaming bodies."""
    completion = sum(r.num_tokens for r in results)
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens": completion,
    }
    if details:
        out["prompt_tokens_details"] = None
        out["completion_tokens_details"] = None
    return out
