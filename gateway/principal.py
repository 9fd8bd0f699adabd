"""Who is calling: the :class:`Principal` an API key resolves to (a leaf module).

:mod:`gateway.keys` makes principals from keys; the proxied routes check model access with
:meth:`Principal.allows`; :mod:`gateway.ratelimit` turns a principal's limits into
descriptors; admission uses its priority. A principal never holds the key itself, only
``key_id`` (a short, non-secret id derived from the key's hash) for limits and labels.

Example::

    who = Principal(key_id="k_1a2b3c4d", models=frozenset({"m"}))
    who.allows("m", None)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ANONYMOUS", "Principal"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller and what it may do (``None`` = unrestricted / no limit)."""

    key_id: str
    name: str | None = None
    tenant: str | None = None
    models: frozenset[str] | None = None
    adapters: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    user_rpm: int | None = None
    user_tpm: int | None = None
    tenant_rpm: int | None = None
    tenant_tpm: int | None = None
    priority: int = 0

    def allows(self, model: str, adapter: str | None) -> bool:
        """May this caller use ``model`` (a base model), through ``adapter`` (a LoRA on it)?

        ``models`` may name an adapter id instead of its base model: that grants the adapter
        only. ``adapters``, when set, restricts which adapters the key may use at all."""
        if adapter is not None and self.adapters is not None and adapter not in self.adapters:
            return False
        if self.models is None or model in self.models:
            return True
        return adapter is not None and adapter in self.models

    limited: bool = field(init=False, default=False)
    """True when any RPM/TPM limit applies to this caller (computed once: read per request)."""

    def __post_init__(self) -> None:
        limits = (self.rpm, self.tpm, self.user_rpm, self.user_tpm, self.tenant_rpm,
                  self.tenant_tpm)  # fmt: skip
        object.__setattr__(self, "limited", any(v is not None for v in limits))


ANONYMOUS = Principal(key_id="anonymous")
"""The caller when no key is configured anywhere (the local default): everything, no limits."""
