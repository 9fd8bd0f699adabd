"""``POST /v1/chat/completions`` and ``POST /v1/completions`` with vLLM's bodies and SSE.

Non-streaming handlers race the generation against a disconnect watcher, so a client that leaves
frees its slots in the core at once; streaming uses :class:`SSEResponse` for the same reason.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectSendStream
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from enginesim.server.driver import ParentGroup
from enginesim.server.errors import EngineHTTPError, bad_request, error_body, status_type
from enginesim.server.generation import (
    ChoicePiece,
    ChoiceResult,
    GenParams,
    check_context,
    run_choice,
    tier_lookup,
    usage_json,
)
from enginesim.server.logprobs import chat_logprobs, completion_logprobs, token_logprobs
from enginesim.server.protocol import ChatCompletionRequest, CompletionRequest
from enginesim.server.runtime import EngineRuntime
from enginesim.server.sampling import verify_sampling
from enginesim.server.sse import Emit, SSEResponse, StreamCrash, wait_disconnect

FORCED_ERROR_HEADER = "x-return-error"
EMPTY_CONVERSATION_MESSAGE = (
    "Cannot apply chat template to an empty conversation. Provide at least one message."
)

__all__ = ["build_openai_router", "chat_prompt_ids", "check_token_ids", "completion_prompts"]


@dataclass(frozen=True, slots=True)
class _Job:
    """One HTTP generation request, validated and tokenised."""

    kind: str  # "chat" | "completion"
    response_id: str
    model: str
    created: int
    prompts: list[list[int]]
    n: int
    max_tokens: list[int]
    params: GenParams
    include_usage: bool
    fingerprint: str


def chat_prompt_ids(rt: EngineRuntime, body: ChatCompletionRequest) -> list[int]:
    if not body.messages:
        raise bad_request(EMPTY_CONVERSATION_MESSAGE)
    msgs = [(m.role, m.text()) for m in body.messages]
    text = rt.codec.chat_prompt(msgs, add_generation_prompt=body.add_generation_prompt)
    return rt.codec.encode(text, add_special_tokens=False)


def completion_prompts(rt: EngineRuntime, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    if p is None or len(p) == 0:
        raise bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt"
        )
    if isinstance(p, str):
        raw: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        raw = [[int(x) for x in p]]  # type: ignore[arg-type]
    else:
        raw = list(p)  # type: ignore[arg-type]
    out = [rt.codec.encode(x) if isinstance(x, str) else list(x) for x in raw]
    if any(len(ids) == 0 for ids in out):
        raise bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt"
        )
    check_token_ids(rt, [t for ids in out for t in ids], param="prompt")
    return out


def check_token_ids(rt: EngineRuntime, ids: list[int], *, param: str) -> None:
    """vLLM rejects ids outside the vocabulary (they would also break detokenising)."""
    bad = next((t for t in ids if not 0 <= t < rt.spec.vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of vocabulary", param=param)


def _admit(rt: EngineRuntime, request: Request, model: str | None) -> str | None:
    rt.check_available()
    adapter = rt.resolve_model(model)
    status = _forced_status(request) or rt.faults.draw_error()
    if status is not None:
        raise EngineHTTPError(status, status_type(status), f"Injected fault: HTTP {status}.")
    return adapter


def _forced_status(request: Request) -> int | None:
    """llm-d-inference-sim's per-request fault: ``X-Return-Error: <status>``."""
    raw = request.headers.get(FORCED_ERROR_HEADER)
    if raw is None:
        return None
    try:
        status = int(raw)
    except ValueError:
        raise bad_request(f"{FORCED_ERROR_HEADER} must be an HTTP status") from None
    if not 400 <= status <= 599:
        raise bad_request(f"{FORCED_ERROR_HEADER} must be an HTTP status")
    return status


def _job(
    rt: EngineRuntime,
    kind: str,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[list[int]],
    adapter: str | None,
) -> _Job:
    max_tokens = [check_context(rt, len(p), body.effective_max_tokens()) for p in prompts]
    for mt in max_tokens:  # vLLM builds SamplingParams per prompt, after clamping max_tokens
        verify_sampling(body, mt)
    params = GenParams(
        stops=tuple(body.stop_list()),
        include_stop=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        adapter=adapter,
        cache_salt=body.cache_salt,
        logprobs=body.logprobs_count(),
    )
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return _Job(
        kind=kind,
        # vLLM accepts a body ``request_id`` and builds the response id from it; the core's
        # token stream is seeded by it, so a caller can replay a request deterministically.
        # Otherwise 16 hex digits, like vLLM 0.32's ids (``cmpl-9e8d70cf72596131``).
        response_id=f"{prefix}-{body.request_id or uuid.uuid4().hex[:16]}",
        model=body.model or rt.spec.served_model_name,
        created=int(time.time()),
        prompts=prompts,
        n=body.n,
        max_tokens=max_tokens,
        params=params,
        include_usage=body.include_usage(),
        fingerprint=rt.system_fingerprint,
    )


async def _run_all(
    rt: EngineRuntime,
    job: _Job,
    on_piece: Callable[[ChoicePiece], Awaitable[None]],
) -> list[ChoiceResult]:
    """Run every (prompt, choice) concurrently; pieces go to ``on_piece`` in arrival order.
    Each prompt is looked up in the KV tier once, before its choices start."""
    results: list[ChoiceResult] = []
    total = len(job.prompts) * job.n
    send, recv = anyio.create_memory_object_stream[ChoicePiece](max_buffer_size=max(16, total))

    async def one(
        idx: int,
        ids: list[int],
        max_tokens: int,
        parent: ParentGroup,
        tier_blocks: int,
        out: ObjectSendStream[ChoicePiece],
    ) -> None:
        async with out:
            rid = f"{job.response_id}-{idx}"
            results.append(
                await run_choice(
                    rt,
                    request_id=rid,
                    index=idx,
                    prompt_ids=ids,
                    max_tokens=max_tokens,
                    params=job.params,
                    parent=parent,
                    out=out,
                    tier_blocks=tier_blocks,
                )  # fmt: skip
            )

    async def prompt(p: int, ids: list[int], out: MemoryObjectSendStream[ChoicePiece]) -> None:
        async with out:
            tier_blocks = await tier_lookup(rt, ids, job.params, choices=job.n)
            parent = ParentGroup(job.n)  # vLLM's ParentRequest: one per prompt, n children
            for j in range(job.n):
                idx = p * job.n + j
                tg.start_soon(one, idx, ids, job.max_tokens[p], parent, tier_blocks, out.clone())

    async def consume(stream: ObjectReceiveStream[ChoicePiece]) -> None:
        async with stream:
            async for piece in stream:
                await on_piece(piece)

    async with anyio.create_task_group() as tg, send:
        for p, ids in enumerate(job.prompts):
            tg.start_soon(prompt, p, ids, send.clone())
        tg.start_soon(consume, recv)
    return sorted(results, key=lambda r: r.index)


def _usage(job: _Job, results: list[ChoiceResult], *, details: bool) -> dict[str, Any]:
    return usage_json(sum(len(p) for p in job.prompts), results, details=details)


def _chunk(job: _Job, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    body: dict[str, Any] = {
        "id": job.response_id, "object": obj, "created": job.created, "model": job.model,
        "choices": choices, **extra,
    }  # fmt: skip
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _logprobs(
    rt: EngineRuntime,
    job: _Job,
    index: int,
    token_ids: tuple[int, ...],
    *,
    start: int = 0,
    text_start: int = 0,
) -> dict[str, Any] | None:
    """Synthetic logprobs of ``token_ids`` (positions ``start...``) when the request asked."""
    k = job.params.logprobs
    if k is None:
        return None
    entries = token_logprobs(
        rt.codec,
        key=f"{job.response_id}-{index}",
        start=start,
        token_ids=token_ids,
        top=k,
        vocab_size=rt.spec.vocab_size,
    )
    if job.kind == "chat":
        return chat_logprobs(entries, k)
    return completion_logprobs(entries, k, text_offset=text_start)


def _piece_chunk(rt: EngineRuntime, job: _Job, piece: ChoicePiece) -> bytes:
    """One streamed token's chunk, with the exact keys vLLM 0.32 sends (tests/contract)."""
    last = piece.finish_reason is not None
    lp = _logprobs(rt, job, piece.index, piece.token_ids, start=piece.start,
                   text_start=piece.text_start)  # fmt: skip
    choice: dict[str, Any]
    if job.kind == "chat":
        choice = {"index": piece.index, "delta": {"content": piece.text}, "logprobs": lp,
                  "finish_reason": piece.finish_reason, "token_ids": None}  # fmt: skip
        if last:
            choice["stop_reason"] = piece.stop_reason
        extra = {"system_fingerprint": job.fingerprint} if last and not job.include_usage else {}
        return _chunk(job, [choice], **extra)
    choice = {"index": piece.index, "text": piece.text, "logprobs": lp,
              "finish_reason": piece.finish_reason, "stop_reason": piece.stop_reason,
              "prompt_token_ids": None, "token_ids": None}  # fmt: skip
    return _chunk(job, [choice])


def _streamer(rt: EngineRuntime, job: _Job) -> Callable[[Emit], Awaitable[None]]:
    async def produce(emit: Emit) -> None:
        crash_after = rt.faults.faults.crash_mid_stream_after_tokens
        sent_tokens = 0
        # vLLM 0.32 sends nothing before the first output: then the role delta of every
        # choice and that output's chunk together (tests/contract: first event = first text).
        roles_sent = job.kind != "chat"

        async def on_piece(piece: ChoicePiece) -> None:
            nonlocal sent_tokens, roles_sent
            if crash_after is not None and sent_tokens >= crash_after:
                raise StreamCrash
            sent_tokens += piece.num_new_tokens
            data = _piece_chunk(rt, job, piece)
            if not roles_sent:
                roles_sent = True
                data = _role_chunks(job) + data
            await emit(data)

        failure: str | None = None
        results: list[ChoiceResult] = []
        try:
            results = await _run_all(rt, job, on_piece)
        except* StreamCrash:
            raise StreamCrash from None
        except* (RuntimeError, ValueError) as eg:
            failure = str(eg.exceptions[0])
        if failure is not None:  # after the 200: one error event, then [DONE] (vLLM)
            err = error_body(500, "InternalServerError", failure)
            await emit(b"data: " + orjson.dumps(err) + b"\n\n")
            await emit(b"data: [DONE]\n\n")
            return
        if job.include_usage:
            usage = _usage(job, results, details=False)
            await emit(_chunk(job, [], usage=usage, system_fingerprint=job.fingerprint))
        await emit(b"data: [DONE]\n\n")

    return produce


def _role_chunks(job: _Job) -> bytes:
    """The role deltas of every choice, sent with the first output (vLLM 0.32)."""
    out = b""
    for i in range(len(job.prompts) * job.n):
        role = {"index": i, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}  # fmt: skip
        out += _chunk(job, [role], prompt_token_ids=None, prompt_text=None)
    return out


def _full_response(rt: EngineRuntime, job: _Job, results: list[ChoiceResult]) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for r in results:
        lp = _logprobs(rt, job, r.index, r.token_ids)
        if job.kind == "chat":
            message = {"role": "assistant", "content": r.text, "refusal": None,
                       "annotations": None, "audio": None, "function_call": None,
                       "reasoning": None}  # fmt: skip
            choices.append({"index": r.index, "message": message, "logprobs": lp,
                            "finish_reason": r.finish_reason, "stop_reason": r.stop_reason,
                            "token_ids": None, "routed_experts": None})  # fmt: skip
        else:
            choices.append({"index": r.index, "text": r.text, "logprobs": lp,
                            "finish_reason": r.finish_reason, "stop_reason": r.stop_reason,
                            "token_ids": None, "prompt_logprobs": None,
                            "prompt_token_ids": None, "routed_experts": None})  # fmt: skip
    out: dict[str, Any] = {
        "id": job.response_id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": job.fingerprint,
        "usage": _usage(job, results, details=True),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }
    if job.kind == "chat":
        out.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
    return out


async def _respond(rt: EngineRuntime, request: Request, job: _Job, stream: bool) -> Response:
    if rt.faults.faults.hang:
        await wait_disconnect(request.receive)  # never answer; leave when the client does
        return Response(status_code=499)
    if stream:
        return SSEResponse(_streamer(rt, job))
    results: list[ChoiceResult] | None = None

    async def noop(_: ChoicePiece) -> None:
        return None

    try:
        async with anyio.create_task_group() as tg:

            async def work() -> None:
                nonlocal results
                results = await _run_all(rt, job, noop)
                tg.cancel_scope.cancel()

            async def watch() -> None:
                await wait_disconnect(request.receive)
                tg.cancel_scope.cancel()

            tg.start_soon(work)
            tg.start_soon(watch)
    except* ValueError as eg:  # the core refused the request (e.g. adapter unloaded meanwhile)
        raise bad_request(str(eg.exceptions[0])) from None
    except* RuntimeError as eg:  # the core died
        raise EngineHTTPError(500, "EngineDeadError", str(eg.exceptions[0])) from None
    if results is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return JSONResponse(_full_response(rt, job, results))


def build_openai_router(rt: EngineRuntime) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        adapter = _admit(rt, request, body.model)
        job = _job(rt, "chat", body, [chat_prompt_ids(rt, body)], adapter)
        return await _respond(rt, request, job, bool(body.stream))

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        adapter = _admit(rt, request, body.model)
        job = _job(rt, "completion", body, completion_prompts(rt, body), adapter)
        return await _respond(rt, request, job, bool(body.stream))

    return router
