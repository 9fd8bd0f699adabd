"""Everything one simulated engine's HTTP app needs, in one explicit container (no globals).

``EngineRuntime`` ties the static ``EngineSpec``, the tokenizer seam (``TextCodec``), the driver,
the metrics, the fault injector, the loaded LoRA adapters and a ``ListenerControl`` (how the
cluster stops/starts listening for the ``refuse_connections`` fault).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import xxhash

from enginesim.server.driver import EngineDriver
from enginesim.server.errors import EngineHTTPError, model_not_found
from enginesim.server.faults import FaultInjector
from enginesim.server.kv_events import KVEventPublisher
from enginesim.server.kvtier import TierClient
from enginesim.server.metrics import EngineMetrics

__all__ = [
    "VLLM_COMPAT_VERSION",
    "EngineRuntime",
    "EngineSpec",
    "ListenerControl",
    "TextCodec",
    "system_fingerprint",
]

VLLM_COMPAT_VERSION = "0.32.0"
"""The vLLM release whose API the simulator reproduces (tests/contract records it)."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Static facts about one engine (from the profile and the cluster config)."""

    served_model_name: str
    model_root: str
    max_model_len: int
    block_size: int
    max_loras: int
    cold_start_s: float
    eos_token_ids: tuple[int, ...]
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    vocab_size: int = 32000
    engine_index: int = 0


def system_fingerprint(spec: EngineSpec) -> str:
    """``vllm-0.32.0-<8 hex>`` like vLLM's responses; the hex hashes the served model and root.

    The ``vllm-<version>-`` prefix is kept verbatim because clients (and tests/contract) read the
    version from it; the 8 hex digits are stable per served model, not vLLM's own value.
    """
    digest = xxhash.xxh3_64_hexdigest(f"{spec.served_model_name}\0{spec.model_root}".encode())
    return f"vllm-{VLLM_COMPAT_VERSION}-{digest[:8]}"


class TextCodec(Protocol):
    """The tokenizer seam: exact counts with the engine's tokenizer and chat template."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def chat_prompt(
        self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool
    ) -> str: ...

    def token_strs(self, token_ids: Sequence[int]) -> list[str]: ...


class ListenerControl(Protocol):
    """Stops and restarts listening on the engine's port (``refuse_connections``).

    ``refuse`` acts shortly after the admin response went out and, with ``for_s``, resumes
    listening (and clears the fault) after that many wall seconds.
    """

    def refuse(self, for_s: float | None) -> None: ...

    def resume(self) -> None: ...


@dataclass(slots=True)
class EngineRuntime:
    """Mutable per-engine state shared by the routes (one per app, never module level)."""

    spec: EngineSpec
    codec: TextCodec
    driver: EngineDriver
    metrics: EngineMetrics
    faults: FaultInjector
    listener: ListenerControl | None = None
    kv_publisher: KVEventPublisher | None = None
    tier: TierClient | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    http_inflight: int = 0

    @property
    def system_fingerprint(self) -> str:
        """vLLM's ``vllm-<version>-<8 hex>`` shape; the hex is derived from what is served."""
        return system_fingerprint(self.spec)

    def is_ready(self) -> bool:
        return self.driver.now() >= self.spec.cold_start_s

    def healthy(self) -> bool:
        return self.is_ready() and not self.faults.faults.dead and self.driver.dead_reason is None

    def valid_models(self) -> list[str]:
        """vLLM's "Valid aliases": the served base names (adapters are not listed)."""
        return [self.spec.served_model_name]

    def resolve_model(self, model: str | None) -> str | None:
        """The adapter a request names (None = base model); 404 for anything unknown."""
        spec = self.spec
        if model is None or model in (spec.served_model_name, spec.model_root):
            return None
        if model in self.adapters:
            return model
        raise model_not_found(model, self.valid_models())

    def check_available(self) -> None:
        """503 while cold-starting or dead."""
        if not self.is_ready():
            raise EngineHTTPError(503, "ServiceUnavailableError", "The engine is starting up.")
        if self.faults.faults.dead or self.driver.dead_reason is not None:
            raise EngineHTTPError(503, "EngineDeadError", "EngineCore encountered an issue.")
