"""LoRA adapter residency: a registry, a CPU LRU cache and ``max_loras`` GPU slots.

Mirrors vLLM's layering: ``load_adapter`` registers an adapter and reads it into the CPU
cache (``max_cpu_loras`` entries, LRU; an evicted adapter stays registered and is re-read
from disk when next used).  A batch may use at most ``max_loras`` distinct adapters (the
scheduler enforces that); before a step, every batch adapter not in a GPU slot is swapped
in, evicting the least recently used slot that the batch does not need.  Each swap-in costs::

    lora_load_overhead_s + size / lora_load_bytes_per_s        (from the CPU cache, PCIe)
                         + size / lora_disk_bytes_per_s         (only if not in the CPU cache)

and is added once, to the step that performs it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

__all__ = ["LoraManager"]


class LoraManager:
    """Adapter registry and slot LRU.

    Example::

        m = LoraManager(max_loras=1, max_cpu_loras=2, bytes_per_s=25e9)
        m.load("sql", size_bytes=50_000_000)
        m.activate(["sql"], {"sql": 50_000_000})  # -> 0.002 s, once
    """

    __slots__ = (
        "max_loras",
        "max_cpu_loras",
        "bytes_per_s",
        "disk_bytes_per_s",
        "overhead_s",
        "_registered",
        "_cpu",
        "_slots",
        "swap_ins",
    )

    def __init__(
        self,
        *,
        max_loras: int,
        max_cpu_loras: int,
        bytes_per_s: float,
        disk_bytes_per_s: float = 2e9,
        overhead_s: float = 0.0,
    ) -> None:
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.bytes_per_s = bytes_per_s
        self.disk_bytes_per_s = disk_bytes_per_s
        self.overhead_s = overhead_s
        self._registered: dict[str, int] = {}
        self._cpu: OrderedDict[str, None] = OrderedDict()
        self._slots: OrderedDict[str, None] = OrderedDict()
        self.swap_ins = 0

    @property
    def enabled(self) -> bool:
        return self.max_loras > 0

    @property
    def registered(self) -> tuple[str, ...]:
        """Loaded adapters, in load order."""
        return tuple(self._registered)

    @property
    def gpu_slots(self) -> tuple[str, ...]:
        """GPU-resident adapters, least recently used first."""
        return tuple(self._slots)

    @property
    def cpu_cache(self) -> tuple[str, ...]:
        """CPU-cached adapters, least recently used first."""
        return tuple(self._cpu)

    def size_of(self, name: str) -> int:
        """Size in bytes of a registered adapter (``KeyError`` if unknown)."""
        return self._registered[name]

    def load(self, name: str, *, size_bytes: int) -> None:
        """Register ``name`` and read it into the CPU cache (``ValueError`` if already loaded)."""
        if not self.enabled:
            raise ValueError("LoRA is disabled on this engine (max_loras = 0)")
        if name in self._registered:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        if size_bytes < 0:
            raise ValueError("size_bytes must be >= 0")
        self._registered[name] = size_bytes
        self._to_cpu(name)

    def unload(self, name: str) -> None:
        """Forget ``name`` (``KeyError`` if unknown); a GPU slot it holds is released."""
        if name not in self._registered:
            raise KeyError(name)
        del self._registered[name]
        self._cpu.pop(name, None)
        self._slots.pop(name, None)

    def activate(self, batch: Iterable[str], sizes: Mapping[str, int]) -> float:
        """Make the batch's adapters GPU-resident; return the swap-in seconds this costs.

        ``batch`` lists distinct adapter names in scheduling order (at most ``max_loras``);
        ``sizes`` gives each one's bytes (requests keep the size they were admitted with).
        """
        names = list(dict.fromkeys(batch))
        if len(names) > self.max_loras:
            raise AssertionError(f"batch uses {len(names)} adapters > max_loras {self.max_loras}")
        needed = set(names)
        cost = 0.0
        for name in names:
            if name in self._slots:
                self._slots.move_to_end(name)
                continue
            if len(self._slots) >= self.max_loras:
                victim = next(n for n in self._slots if n not in needed)
                del self._slots[victim]
            size = sizes[name]
            cost += self.overhead_s + size / self.bytes_per_s
            if name not in self._cpu:
                cost += size / self.disk_bytes_per_s
            if name in self._registered:  # an unloaded adapter still serving its requests
                self._to_cpu(name)
            self._slots[name] = None
            self.swap_ins += 1
        return cost

    def _to_cpu(self, name: str) -> None:
        if name in self._cpu:
            self._cpu.move_to_end(name)
            return
        while len(self._cpu) >= self.max_cpu_loras:
            victim = next((n for n in self._cpu if n not in self._slots), None)
            if victim is None:
                break
            del self._cpu[victim]
        self._cpu[name] = None
