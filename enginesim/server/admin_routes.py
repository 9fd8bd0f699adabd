"""vLLM's non-generation endpoints plus the peers' probes and the fault admin API.

``/health``, ``/v1/models``, ``/metrics``, ``/tokenize``, LoRA load/unload (exact statuses and
bodies of vllm-contract.md §3), ``/load``, ``/get_load``, SGLang-style ``/server_info`` and
``/model_info``, the ``/render`` endpoints, ``/version``, ``/ping`` and ``/admin/faults``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query
from fastapi.responses import Response

from enginesim.server.errors import EngineHTTPError, bad_request
from enginesim.server.openai_routes import chat_prompt_ids, check_token_ids, completion_prompts
from enginesim.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FaultsUpdate,
    LoadLoraRequest,
    TokenizeRequest,
    UnloadLoraRequest,
)
from enginesim.server.runtime import EngineRuntime

__all__ = ["build_admin_router"]

SIM_VERSION = "0.32.0+enginesim"
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def adapter_size_bytes(path: Path) -> int:
    """Bytes of the adapter's files (a directory of safetensors, or one file)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files[:1000]:
            total += (Path(root) / name).stat().st_size
    return total


def _already_loaded(name: str) -> EngineHTTPError:
    return EngineHTTPError(
        400,
        "InvalidUserInput",
        f"The lora adapter '{name}' has already been loaded. If you want to load the "
        "adapter in place, set 'load_inplace' to True.",
    )


def _model_card(rt: EngineRuntime, name: str, root: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": rt.created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": rt.spec.max_model_len if parent is None else None,
        "permission": [
            {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": rt.created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


def _sampling_params(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> dict[str, Any]:
    return {
        "n": body.n,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "seed": body.seed,
        "stop": body.stop_list(),
        "stop_token_ids": body.stop_token_ids or [],
        "ignore_eos": body.ignore_eos,
        "max_tokens": max_tokens,
    }


def build_admin_router(rt: EngineRuntime) -> APIRouter:  # noqa: C901 - a flat list of routes
    router = APIRouter()
    spec = rt.spec

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if rt.healthy() else 503)

    @router.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200 if rt.healthy() else 503)

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": SIM_VERSION}

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [_model_card(rt, spec.served_model_name, spec.model_root, None)]
        data += [_model_card(rt, n, p, spec.served_model_name) for n, p in rt.adapters.items()]
        return {"object": "list", "data": data}

    # As vLLM 0.32 serves them: ``/metrics`` is the whole page whatever the query, and
    # ``/metrics/`` (prometheus_client's mounted app) honours ``?name[]=a&name[]=b``, the
    # filter the gateway's scraper uses.
    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(rt.metrics.render(), media_type=METRICS_MEDIA_TYPE)

    @router.get("/metrics/")
    async def metrics_filtered(
        names: Annotated[list[str] | None, Query(alias="name[]")] = None,
    ) -> Response:
        return Response(rt.metrics.render(names or ()), media_type=METRICS_MEDIA_TYPE)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        rt.resolve_model(body.model)
        if body.messages is not None:
            chat = ChatCompletionRequest(
                messages=body.messages, add_generation_prompt=body.add_generation_prompt
            )
            tokens = chat_prompt_ids(rt, chat)
        elif body.prompt is not None:
            tokens = rt.codec.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise bad_request("Either prompt or messages must be provided.")
        strs = rt.codec.token_strs(tokens) if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": spec.max_model_len, "tokens": tokens,
                "token_strs": strs}  # fmt: skip

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        rt.resolve_model(body.model)
        check_token_ids(rt, body.tokens, param="tokens")
        return {"prompt": rt.codec.decode(body.tokens)}

    @router.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest) -> Response:
        name, path = body.lora_name, body.lora_path
        if name in rt.adapters and not body.load_inplace:
            raise _already_loaded(name)
        p = Path(path)
        if not await anyio.to_thread.run_sync(p.exists):
            raise EngineHTTPError(
                404, "NotFoundError", f"Loading lora {name} failed: No adapter found for {path}"
            )
        size = await anyio.to_thread.run_sync(adapter_size_bytes, p)
        # vLLM's load reads the weights from disk into its CPU LoRA cache before answering:
        # that read (size / lora_disk_bytes_per_s simulated seconds) is the load's latency.
        read_s = size / rt.driver.core.profile.lora_disk_bytes_per_s
        if read_s > 0:
            await anyio.sleep(read_s / rt.driver.speed)
        if name in rt.adapters and not body.load_inplace:  # a concurrent load won the race
            raise _already_loaded(name)
        try:
            if name in rt.adapters:
                rt.driver.core.unload_adapter(name)
            rt.driver.core.load_adapter(name, size_bytes=size)
        except ValueError as exc:
            raise EngineHTTPError(400, "InvalidUserInput", str(exc)) from exc
        rt.adapters[name] = path
        rt.metrics.record_lora(rt.driver.core.stats())
        return Response(f"Success: LoRA adapter '{name}' added successfully.", status_code=200)

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraRequest) -> Response:
        name = body.lora_name
        if name not in rt.adapters:
            raise EngineHTTPError(
                404, "NotFoundError", f"The lora adapter '{name}' cannot be found."
            )
        rt.driver.core.unload_adapter(name)
        del rt.adapters[name]
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", status_code=200)

    @router.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        if not rt.driver.reset_prefix_cache():
            raise bad_request("The prefix cache cannot be reset while requests hold KV blocks.")
        return Response(status_code=200)

    @router.get("/load")
    async def load() -> dict[str, int]:
        return {"server_load": rt.http_inflight}

    @router.get("/get_load")
    async def get_load() -> dict[str, int]:
        st = rt.driver.core.stats()
        return {"load": st.num_running + st.num_waiting}

    def server_info() -> dict[str, Any]:
        st = rt.driver.core.stats()
        return {
            "model_path": spec.model_root,
            "served_model_name": spec.served_model_name,
            "tokenizer_path": spec.model_root,
            "context_length": spec.max_model_len,
            "max_total_num_tokens": st.num_blocks * st.block_size,
            "max_running_requests": spec.max_num_seqs,
            "max_num_batched_tokens": spec.max_num_batched_tokens,
            "page_size": st.block_size,
            "max_loras": spec.max_loras,
            "version": SIM_VERSION,
            "engine": "enginesim",
        }

    def model_info() -> dict[str, Any]:
        return {"model_path": spec.model_root, "tokenizer_path": spec.model_root,
                "is_generation": True, "served_model_name": spec.served_model_name,
                "max_model_len": spec.max_model_len}  # fmt: skip

    for path in ("/server_info", "/get_server_info"):
        router.add_api_route(path, server_info, methods=["GET"])
    for path in ("/model_info", "/get_model_info"):
        router.add_api_route(path, model_info, methods=["GET"])

    @router.post("/v1/chat/completions/render")
    async def render_chat(body: ChatCompletionRequest) -> dict[str, Any]:
        rt.resolve_model(body.model)
        ids = chat_prompt_ids(rt, body)
        return {"request_id": f"chatcmpl-{uuid.uuid4().hex}", "token_ids": ids,
                "sampling_params": _sampling_params(body, body.effective_max_tokens()),
                "model": body.model or spec.served_model_name}  # fmt: skip

    @router.post("/v1/completions/render")
    async def render_completions(body: CompletionRequest) -> list[dict[str, Any]]:
        rt.resolve_model(body.model)
        return [
            {
                "request_id": f"cmpl-{uuid.uuid4().hex}-{i}",
                "token_ids": ids,
                "sampling_params": _sampling_params(body, body.effective_max_tokens()),
                "model": body.model or spec.served_model_name,
            }  # fmt: skip
            for i, ids in enumerate(completion_prompts(rt, body))
        ]

    @router.get("/admin/faults")
    async def get_faults() -> dict[str, Any]:
        return rt.faults.faults.as_json()

    @router.post("/admin/faults")
    async def set_faults(body: FaultsUpdate) -> dict[str, Any]:
        before = rt.faults.faults.refuse_connections
        faults = rt.faults.update(body)
        if faults.refuse_connections != before:
            if rt.listener is None:
                rt.faults.set_refusing(before)
                raise bad_request("refuse_connections needs a cluster-run engine")
            if faults.refuse_connections:
                rt.listener.refuse(body.refuse_for_s)
            else:
                rt.listener.resume()
        return rt.faults.faults.as_json()

    return router
