"""The server's tokenizer: the core's :class:`~enginesim.core.tokenizer.ChatCodec` per profile.

Without a ``tokenizer.json`` the engine uses the file-free ``HashTokenizer`` (deterministic,
BPE-like counts); with one (e.g. SmolLM2's from the real-engine setup) counts are exact. The
chat template is ChatML; models whose template injects a default system prompt get it here.
"""

from __future__ import annotations

from pathlib import Path

from enginesim.core.profile import EngineProfile
from enginesim.core.tokenizer import ChatCodec, load_tokenizer
from enginesim.server.runtime import TextCodec

__all__ = ["DEFAULT_SYSTEM_PROMPTS", "load_codec"]

DEFAULT_SYSTEM_PROMPTS: dict[str, str] = {
    # SmolLM2-Instruct's chat template adds this when the first message is not a system one.
    "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
}


def load_codec(profile: EngineProfile, tokenizer: str | Path | None = None) -> TextCodec:
    """The tokenizer and chat template of ``profile``'s model (``tokenizer``: a local file/dir)."""
    tok = load_tokenizer(tokenizer, vocab_size=profile.vocab_size)
    model = profile.model.lower()
    system = next((s for key, s in DEFAULT_SYSTEM_PROMPTS.items() if key in model), None)
    return ChatCodec(tok, default_system=system)
