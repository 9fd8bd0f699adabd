"""Wire models (pydantic, edges only) for the simulated engine's vLLM-compatible API.

Unknown fields are ignored like vLLM does (it warns and still returns 200); wrong types fail
validation and become 400 ``Bad Request`` (see ``errors.py``). Value ranges (``n``, ``max_tokens``,
``temperature``, ...) are *not* pydantic constraints: vLLM checks them after tokenising, in
``SamplingParams._verify_args``, with its own messages (``enginesim/server/sampling.py``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "FaultsUpdate",
    "LoadLoraRequest",
    "StreamOptions",
    "TokenizeRequest",
    "UnloadLoraRequest",
]


MAX_STOPS = 4


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text, with content parts of type ``text`` concatenated."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class _Sampling(_Lenient):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int = 1
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    cache_salt: str | None = None
    request_id: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        """vLLM 0.32 (OpenAI's limit): at most 4 stop strings, else 400 on ``body.stop``."""
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise PydanticCustomError(
                "too_long",
                "List should have at most {max_length} items after validation, not {actual_length}",
                {"field_type": "List", "max_length": MAX_STOPS, "actual_length": len(v)},
            )
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    logprobs: bool | None = False
    top_logprobs: int | None = 0

    def logprobs_count(self) -> int | None:
        """Alternatives per token when logprobs are asked for (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def effective_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    echo: bool | None = False
    logprobs: int | None = None

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


class TokenizeRequest(_Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class LoadLoraRequest(_Lenient):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraRequest(_Lenient):
    lora_name: str
    lora_int_id: int | None = None


class FaultsUpdate(BaseModel):
    """Partial update of the fault settings; omitted fields keep their value."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    error_status: list[int] | None = None
    hang: bool | None = None
    slowdown: float | None = Field(default=None, ge=1.0, le=1000.0)
    crash_mid_stream_after_tokens: int | None = Field(default=None, ge=0)
    refuse_connections: bool | None = None
    refuse_for_s: float | None = Field(default=None, gt=0.0, le=3600.0)
    dead: bool | None = None
    clear: bool = False
