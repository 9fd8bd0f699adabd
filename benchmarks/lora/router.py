"""Benchmark-side routers for the baseline contenders (no gateway in the path).

The gateway cannot express "load the adapter wherever the request lands": its on-demand load
only fires when an adapter is loaded nowhere, and its LoRA filter then keeps the request on the
engines that hold it. So the baselines route in the load generator, straight to the engines,
with the same engine calls a naive gateway would make:

* ``random-ondemand`` -- a uniformly random engine; if it does not hold the adapter, load it
  there now (the request waits), first unloading that engine's least recently used adapter
  with no request in flight when all ``max_loras`` slots are taken.
* ``least-request-ondemand`` -- the engine with the fewest in-flight requests (ties at random),
  then the same on-demand load.
* ``static`` -- adapters pinned round-robin before the run (``preload``), every request goes
  to its adapter's engine; no load or unload after. With more adapters than slots an engine
  holds more adapters than ``max_loras`` (vLLM allows it: they swap GPU slots per batch, up to
  ``--max-cpu-loras`` kept in CPU memory).

Concurrent requests for an adapter being loaded on their engine wait for that one load
(coalesced). Waiting for a free slot is bounded (``slot_wait_s`` wall seconds, then the request
fails like the gateway's 503). Every load/unload is counted. Usage::

    router = ClientRouter(urls, mode="random", max_loras=8, paths=paths, session=session)
    async with router.route("adapter-03") as (url, waited_wall_s):
        ...  # POST url + "/v1/chat/completions"
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import anyio

__all__ = ["ClientRouter", "RouteError", "RouterMode"]

RouterMode = Literal["random", "least-request", "static"]
_POLL_S = 0.005


class RouteError(RuntimeError):
    """No slot came free in time, or the engine refused a load."""


@dataclass(slots=True)
class _Engine:
    url: str
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU first
    loading: dict[str, anyio.Event] = field(default_factory=dict)
    reserved: int = 0  # loads that got their slot and are in flight
    in_flight: int = 0
    active: Counter[str] = field(default_factory=Counter)


class ClientRouter:
    """Routes adapter requests to engines and loads adapters on demand (module docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        mode: RouterMode,
        max_loras: int,
        paths: Mapping[str, str],
        session: aiohttp.ClientSession,
        seed: int = 0,
        slot_wait_s: float = 30.0,
        call_timeout_s: float = 60.0,
    ) -> None:
        if not urls or max_loras < 1:
            raise ValueError("need engines and max_loras >= 1")
        self.mode = mode
        self.max_loras = max_loras
        self._engines = [_Engine(u) for u in urls]
        self._paths = dict(paths)
        self._session = session
        self._rng = random.Random(seed)
        self._slot_wait_s = slot_wait_s
        self._timeout = aiohttp.ClientTimeout(total=call_timeout_s)
        self._home: dict[str, _Engine] = {}
        self.loads = 0
        self.unloads = 0
        self.preloads = 0
        self.load_failures = 0

    async def preload(self, adapters: Sequence[str]) -> None:
        """``static``: pin ``adapters`` round-robin over the engines (counted as preloads)."""
        for i, name in enumerate(adapters):
            engine = self._engines[i % len(self._engines)]
            await self._post(engine, "/v1/load_lora_adapter",
                             {"lora_name": name, "lora_path": self._paths[name]})  # fmt: skip
            engine.loaded[name] = None
            self._home[name] = engine
            self.preloads += 1

    @contextlib.asynccontextmanager
    async def route(self, adapter: str) -> AsyncIterator[tuple[str, float | None]]:
        """Yield (engine URL, wall seconds waited for a load or ``None``) for one request."""
        engine = self._pick(adapter)
        engine.in_flight += 1
        engine.active[adapter] += 1
        try:
            waited = None if self.mode == "static" else await self._ensure(engine, adapter)
            yield engine.url, waited
        finally:
            engine.in_flight -= 1
            engine.active[adapter] -= 1
            if engine.active[adapter] <= 0:
                del engine.active[adapter]
            if adapter in engine.loaded:
                engine.loaded.move_to_end(adapter)

    def _pick(self, adapter: str) -> _Engine:
        if self.mode == "static":
            try:
                return self._home[adapter]
            except KeyError:
                raise RouteError(f"{adapter} was not preloaded") from None
        if self.mode == "random":
            return self._rng.choice(self._engines)
        least = min(e.in_flight for e in self._engines)
        return self._rng.choice([e for e in self._engines if e.in_flight == least])

    async def _ensure(self, engine: _Engine, adapter: str) -> float | None:
        if adapter in engine.loaded:
            engine.loaded.move_to_end(adapter)
            return None
        start = time.perf_counter()
        pending = engine.loading.get(adapter)
        if pending is not None:  # coalesce onto the load in progress
            await pending.wait()
            if adapter not in engine.loaded:
                raise RouteError(f"load of {adapter} on {engine.url} failed")
            return time.perf_counter() - start
        done = anyio.Event()
        engine.loading[adapter] = done
        try:
            await self._reserve_slot(engine)  # on success it holds a slot: released below
            try:
                body = {"lora_name": adapter, "lora_path": self._paths[adapter]}
                await self._post(engine, "/v1/load_lora_adapter", body)
            finally:
                engine.reserved -= 1
            engine.loaded[adapter] = None
            self.loads += 1
        except (RouteError, aiohttp.ClientError, TimeoutError):
            self.load_failures += 1
            raise
        finally:
            del engine.loading[adapter]
            done.set()
        return time.perf_counter() - start

    async def _reserve_slot(self, engine: _Engine) -> None:
        """Take a slot for one load: a free one, else unload the least recently used adapter
        with no request in flight there; else wait for one (bounded). Only loads that hold a
        slot count against ``max_loras`` (loads still waiting for room never block each other)."""
        deadline = time.perf_counter() + self._slot_wait_s
        while True:
            if len(engine.loaded) + engine.reserved < self.max_loras:
                engine.reserved += 1
                return
            victim = next((a for a in engine.loaded if engine.active[a] == 0), None)
            if victim is not None:
                del engine.loaded[victim]
                engine.reserved += 1  # the slot it frees is this load's
                try:
                    await self._post(engine, "/v1/unload_lora_adapter", {"lora_name": victim})
                except BaseException:
                    engine.reserved -= 1
                    raise
                self.unloads += 1
                return
            if time.perf_counter() > deadline:
                raise RouteError(f"no free LoRA slot on {engine.url} in {self._slot_wait_s} s")
            await anyio.sleep(_POLL_S)

    async def _post(self, engine: _Engine, path: str, body: dict[str, str]) -> None:
        async with self._session.post(engine.url + path, json=body, timeout=self._timeout) as r:
            text = await r.text()
            if r.status != 200:
                raise RouteError(f"{engine.url}{path} {body}: {r.status} {text[:200]}")
