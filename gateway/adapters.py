"""The LoRA adapter registry: the adapters the gateway manages, wherever they are loaded.

An adapter is declared in the config (``lora.adapters``), through the admin API
(:mod:`gateway.routes.adapters`) or in a Kubernetes ConfigMap (:mod:`gateway.adapter_source`);
each entry remembers its ``origin``, and only the admin API's own entries can be deleted
through it (config entries change with the config, ConfigMap entries with the ConfigMap).
The registry lives in memory: admin entries are lost on restart and are not shared between
replicas (declare adapters in the config or a ConfigMap for that; docs/lora.md).

``source`` is where engines read the adapter. :class:`SourceResolver` turns it into what
vLLM's ``lora_path`` accepts; :class:`LocalSources`, the default, takes an absolute path or
a ``file://`` URL the engines can read. A production fleet with adapters in S3, GCS or the
Hugging Face Hub plugs a resolver in here that maps ``s3://...`` to the path a download
sidecar (or a shared volume) puts it at, or passes the name through to vLLM's own resolver
plugins (``VLLM_PLUGINS=lora_filesystem_resolver``, a custom ``LoRAResolver``).

Example::

    registry = AdapterRegistry(LocalSources())
    registry.add(AdapterSpec("sql", base_model="llama", source="/models/lora-sql", rank=8))
    registry.get("sql").card()
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from gateway.settings import LoraAdapterConfig

__all__ = [
    "AdapterConflict",
    "AdapterRefused",
    "AdapterRegistry",
    "AdapterSpec",
    "LocalSources",
    "Origin",
    "SourceResolver",
]

CARD_CREATED = 1700000000


class Origin(enum.StrEnum):
    CONFIG = "config"
    ADMIN = "admin"
    CONFIGMAP = "configmap"


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """One registered adapter. Example: ``AdapterSpec("sql", "llama", "/models/sql")``."""

    name: str
    base_model: str
    source: str
    rank: int | None = None
    origin: Origin = Origin.CONFIG

    @classmethod
    def from_config(cls, cfg: LoraAdapterConfig, origin: Origin = Origin.CONFIG) -> AdapterSpec:
        return cls(cfg.name, cfg.base_model, cfg.source, cfg.rank, origin)

    def card(self) -> dict[str, Any]:
        """The ``/v1/models`` entry of a registered adapter no healthy engine lists yet (the
        shape of vLLM's adapter card: ``parent`` = base model, ``root`` = source)."""
        return {"id": self.name, "object": "model", "created": CARD_CREATED,
                "owned_by": "switchyard", "root": self.source, "parent": self.base_model,
                "max_model_len": None, "permission": []}  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "base_model": self.base_model, "source": self.source,
                "rank": self.rank, "origin": self.origin.value}  # fmt: skip


class SourceResolver(Protocol):
    """Turns an adapter's ``source`` into vLLM's ``lora_path`` (the seam for object stores).

    ``check`` runs at registration and raises ``ValueError`` for a source it cannot serve;
    ``lora_path`` runs before each load (it may do I/O: a download, a sidecar call)."""

    def check(self, source: str) -> None: ...

    async def lora_path(self, spec: AdapterSpec) -> str: ...


class LocalSources:
    """Absolute paths and ``file://`` URLs the engines can read as they are.

    Example: ``await LocalSources().lora_path(spec)`` -> ``"/models/lora-sql"``."""

    def check(self, source: str) -> None:
        self._path(source)

    async def lora_path(self, spec: AdapterSpec) -> str:
        return self._path(spec.source)

    @staticmethod
    def _path(source: str) -> str:
        if source.startswith("file://"):
            parts = urlsplit(source)
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"source {source!r}: a file:// URL names no host")
            path = unquote(parts.path)
        elif "://" in source:
            scheme = source.split("://", 1)[0]
            raise ValueError(
                f"source scheme {scheme!r} needs a SourceResolver (docs/lora.md); the default"
                " reads absolute paths and file:// URLs"
            )
        else:
            path = source
        if not PurePosixPath(path).is_absolute():
            raise ValueError(f"source {source!r} is not an absolute path")
        return path


class AdapterConflict(Exception):
    """A name already registered, or an entry its caller may not change (see the message)."""


class AdapterRefused(ValueError):
    """A registration the registry refuses; ``param`` is the field at fault (``name``), or
    None when no field is (the registry is full). A refused source is a plain ``ValueError``
    from the resolver."""

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class AdapterRegistry:
    """Name -> :class:`AdapterSpec`, bounded by ``max_adapters``; ``version`` counts changes.

    One event loop, no locks. Reads (:meth:`get`) are a dict lookup: the request path asks
    only for a model no engine lists."""

    def __init__(
        self,
        resolver: SourceResolver | None = None,
        *,
        specs: Iterable[AdapterSpec] = (),
        max_adapters: int = 10_000,
    ) -> None:
        self.resolver: SourceResolver = resolver or LocalSources()
        self.max_adapters = max_adapters
        self._specs: dict[str, AdapterSpec] = {}
        self.version = 0
        for spec in specs:
            self.add(spec)

    def get(self, name: str) -> AdapterSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[AdapterSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)

    def count(self, origin: Origin) -> int:
        return sum(1 for spec in self._specs.values() if spec.origin is origin)

    def add(self, spec: AdapterSpec) -> AdapterSpec:
        """Register ``spec``; :class:`AdapterConflict` when the name is taken, ``ValueError``
        for a source the resolver refuses or a full registry."""
        if spec.name in self._specs:
            raise AdapterConflict(f"adapter {spec.name!r} is already registered")
        self._validate(spec)
        self._specs[spec.name] = spec
        self.version += 1
        return spec

    def remove(self, name: str, *, origin: Origin = Origin.ADMIN) -> AdapterSpec:
        """Unregister an entry of ``origin``: ``KeyError`` when unknown, :class:`AdapterConflict`
        when it came from elsewhere (the config, a ConfigMap)."""
        spec = self._specs[name]
        if spec.origin is not origin:
            raise AdapterConflict(
                f"adapter {name!r} comes from the {spec.origin.value}; change it there"
            )
        del self._specs[name]
        self.version += 1
        return spec

    def sync(self, origin: Origin, specs: Iterable[AdapterSpec]) -> tuple[list[str], list[str]]:
        """Make the entries of ``origin`` exactly ``specs`` (a ConfigMap's new content).
        Names another origin holds are skipped; an invalid entry is skipped. Returns
        (added or changed, removed)."""
        wanted: dict[str, AdapterSpec] = {}
        for spec in specs:
            held = self._specs.get(spec.name)
            if held is not None and held.origin is not origin:
                continue
            wanted[spec.name] = spec
        removed = [n for n, s in self._specs.items() if s.origin is origin and n not in wanted]
        for name in removed:
            del self._specs[name]
        changed: list[str] = []
        for name, spec in wanted.items():
            if self._specs.get(name) == spec:
                continue
            try:
                self._validate(spec, replacing=name in self._specs)
            except ValueError:
                continue
            self._specs[name] = spec
            changed.append(name)
        if removed or changed:
            self.version += 1
        return changed, removed

    def _validate(self, spec: AdapterSpec, *, replacing: bool = False) -> None:
        if spec.name == spec.base_model:
            raise AdapterRefused("an adapter's name must differ from its base model",
                                 param="name")  # fmt: skip
        if not replacing and len(self._specs) >= self.max_adapters:
            raise AdapterRefused(f"the registry is full ({self.max_adapters} adapters)",
                                 param=None)  # fmt: skip
        self.resolver.check(spec.source)
