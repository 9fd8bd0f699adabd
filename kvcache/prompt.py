"""Prompt text as engines see it: OpenAI message content and the ChatML template.

The gateway hashes prompts into token blocks that must line up with what the engine caches,
and enginesim renders the same messages for its own tokenizer; both call these functions so
the two can never drift apart.

Example::

    >>> render_chatml([("user", "hi")])
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["message_text", "render_chatml"]


def message_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string, or the text parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        )
    return str(content)


def render_chatml(
    pairs: Iterable[tuple[str, str]],
    *,
    add_generation_prompt: bool = True,
    default_system: str | None = None,
) -> str:
    """``(role, text)`` pairs as a ChatML prompt.

    ``default_system`` is prepended when no system message is present (SmolLM2's template
    does this); ``add_generation_prompt`` appends the assistant header.
    """
    items = list(pairs)
    out: list[str] = []
    if default_system is not None and not any(role == "system" for role, _ in items):
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    out.extend(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in items)
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
