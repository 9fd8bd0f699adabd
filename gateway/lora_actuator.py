"""The LoRA actuator: load and unload adapters on engines, and the book of what they hold.

What an engine holds is what its ``/v1/models`` lists with a ``parent`` (refreshed by every
health probe, :mod:`gateway.health`): that is the truth, and :meth:`LoraBook.reconcile`
follows it -- an engine restart empties it, an adapter loaded by hand appears. The book
adds what ``/v1/models`` does not say: when each adapter was loaded there (minimum
residency; an adapter first seen without our load counts from when it was seen) and which
loads are in flight. :meth:`LoraBook.slots` turns both into :class:`routing.lora.EngineSlots`
for the pure decisions.

:class:`LoraActuator` makes the calls (``POST /v1/load_lora_adapter`` ``{lora_name,
lora_path}``, ``POST /v1/unload_lora_adapter`` ``{lora_name}``, vllm-contract.md section 3)
on the control-plane session: each bounded by ``lora.request_timeout_s``, at most
``lora.max_concurrent_ops`` at once, one load per (adapter, engine) at a time (a second
caller gets the same future). Operations on one (adapter, engine) never overlap: an unload
waits for that engine's load of the adapter in flight (else the engine answers 404 during
the load's disk read, and the load lands after it: the engine holds an adapter the book
forgot) and the calls themselves take a per-(adapter, engine) lock. A success updates the
engine's model list at once (routing sees the adapter without waiting for the next probe);
"already loaded" (400) counts as a successful load; "cannot be found" on unload (404) is
counted ``ok`` but changes neither the book nor the model list: the engine's next
``/v1/models`` (:meth:`LoraBook.reconcile`) says what it holds.

:class:`LoadBackoff` remembers refused and failed loads per (adapter, engine): that engine
is not asked to load the adapter again before :func:`routing.lora.load_backoff` passes
(5 s doubling to 5 min by default), a success or a changed registration forgets it. The
book's :meth:`LoraBook.slots` hands it to the pure decisions (``EngineSlots.blocked``).

Example::

    actuator = LoraActuator(client=control, adapters=adapters, book=book,
                            settings=settings.lora, metrics=lora_metrics)
    await actuator.load(state, spec, reason="demand")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import orjson

from gateway.adapters import AdapterRegistry, AdapterSpec
from gateway.endpoints import EndpointRegistry, EndpointState, ModelCard
from gateway.errors import AdapterLoadFailed, AdapterRejected, GatewayError, UpstreamTimeout
from gateway.lora_metrics import LoraMetrics
from gateway.settings import LoraSettings
from gateway.upstream import Upstream
from routing.lora import EngineSlots, PlacementSettings, load_backoff

__all__ = ["LoadBackoff", "LoadFailure", "LoraActuator", "LoraBook"]

log = logging.getLogger(__name__)

MAX_ANSWER = 64 * 1024
"""Bytes of a load/unload answer read (an error message); the rest is dropped."""


BEFORE_US = 1e9
"""Seconds before ``now`` that an adapter an engine held before this process first saw its
model list is dated: long past any minimum residency, least recently used of all."""


def _noop() -> None:
    pass


class LoraBook:
    """Per engine: adapter -> clock seconds it was loaded (or first seen), and the loads in
    flight. ``clock`` is monotonic seconds (the placement decisions' ``now``);
    ``default_max_loras`` an engine's slots until its ``max_lora`` is scraped. What routing
    needs of it reaches each engine's snapshot through
    :meth:`routing.state.EngineState.set_lora_slots` (loading adapters, the default slots)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        default_max_loras: int = 1,
        max_cpu_loras: int | None = None,
    ) -> None:
        self.clock = clock
        self.default_max_loras = default_max_loras
        self.max_cpu_loras = max_cpu_loras
        """Adapters each engine holds (vLLM's CPU LoRA cache; None: its ``max_loras``)."""
        self._loaded: dict[str, dict[str, float]] = {}
        self._loading: dict[str, set[str]] = {}
        self._preloaded: dict[str, set[str]] = {}
        """Per engine: adapters our preload loaded there (``reason="preload"``)."""
        self._leaving: dict[tuple[str, str], int] = {}
        """(engine, adapter) -> unloads decided or in flight there (not counted held)."""

    def leave(self, engine_id: str, adapter: str) -> Callable[[], None]:
        """An unload of ``adapter`` from the engine was decided or runs: until the returned
        release is called (idempotent), :meth:`slots` no longer lists it there, so a second
        decision made meanwhile neither picks it as its victim too (two loads into one freed
        slot) nor counts its slot."""
        key = (engine_id, adapter)
        self._leaving[key] = self._leaving.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._leaving[key] - 1
            if left:
                self._leaving[key] = left
            else:
                del self._leaving[key]

        return release

    def loaded(self, engine_id: str) -> Mapping[str, float]:
        return self._loaded.get(engine_id, {})

    def loading(self, engine_id: str) -> frozenset[str]:
        return frozenset(self._loading.get(engine_id, ()))

    def begin(self, state: EndpointState, adapter: str) -> None:
        self._loading.setdefault(state.id, set()).add(adapter)
        self.publish(state)

    def end(self, state: EndpointState, adapter: str) -> None:
        held = self._loading.get(state.id)
        if held is not None:
            held.discard(adapter)
            if not held:
                del self._loading[state.id]
        self.publish(state)

    def publish(self, state: EndpointState) -> None:
        """The engine's snapshot fields: adapters being loaded there, default slots."""
        state.engine.set_lora_slots(self.default_max_loras, self.loading(state.id))

    def mark_loaded(self, engine_id: str, adapter: str, *, preload: bool = False) -> None:
        """``preload``: loaded ahead of any request (:attr:`EngineSlots.preloaded` until one
        asks for it); any other load of it there clears that."""
        self._loaded.setdefault(engine_id, {})[adapter] = self.clock()
        if preload:
            self._preloaded.setdefault(engine_id, set()).add(adapter)
        else:
            self._forget_preload(engine_id, adapter)

    def mark_unloaded(self, engine_id: str, adapter: str) -> None:
        self._loaded.get(engine_id, {}).pop(adapter, None)
        self._forget_preload(engine_id, adapter)

    def _forget_preload(self, engine_id: str, adapter: str) -> None:
        held = self._preloaded.get(engine_id)
        if held is not None:
            held.discard(adapter)
            if not held:
                del self._preloaded[engine_id]

    def reconcile(self, endpoints: EndpointRegistry) -> tuple[int, int]:
        """Follow what the engines list: adapters seen without our load are recorded from
        now -- except those an engine already listed the first time this process saw its
        model list (a gateway restart, a worker that does not run the controller): they were
        loaded before it looked, are dated :data:`BEFORE_US` and so are past minimum
        residency; adapters gone (a restart, an unload by hand) are forgotten; engines gone
        are dropped. Returns (appeared, vanished)."""
        now = self.clock()
        appeared = vanished = 0
        present: set[str] = set()
        for state in endpoints:
            present.add(state.id)
            self.publish(state)
            if not state.models:
                continue  # not probed yet: nothing known, and not "seen" either
            listed = {card.id for card in state.models if card.parent}
            first = state.id not in self._loaded
            book = self._loaded.setdefault(state.id, {})
            for gone in [a for a in book if a not in listed]:
                del book[gone]
                self._forget_preload(state.id, gone)
                vanished += 1
            for name in listed - book.keys():
                book[name] = now - BEFORE_US if first else now
                appeared += 1
        for eid in [e for e in self._loaded if e not in present]:
            del self._loaded[eid]
        for eid in [e for e in self._loading if e not in present]:
            del self._loading[eid]
        for eid in [e for e in self._preloaded if e not in present]:
            del self._preloaded[eid]
        return appeared, vanished

    def slots(
        self,
        endpoints: EndpointRegistry,
        *,
        last_used: Mapping[str, float],
        blocked: Mapping[str, frozenset[str]] | None = None,
    ) -> list[EngineSlots]:
        """Every engine with a known base model as :class:`EngineSlots`: loaded = what it
        lists (with the book's load times), ``max_loras`` scraped else the default,
        ``max_cpu_loras`` the configured residency capacity,
        ``last_used`` each adapter's last request anywhere (the gateway does not track it
        per engine), ``active`` what the engine reports running or waiting, ``blocked``
        the adapters whose loads there back off (:meth:`LoadBackoff.blocked`),
        ``preloaded`` our preloads there that no request has asked for (none in
        ``last_used``)."""
        blocked = blocked or {}
        out: list[EngineSlots] = []
        now = self.clock()
        for state in endpoints:
            base = state.base_model()
            if base is None:
                continue
            book = self._loaded.get(state.id, {})
            loaded = {
                c.id: book.get(c.id, now)
                for c in state.models
                if c.parent and (state.id, c.id) not in self._leaving
            }
            snap = state.snapshot()
            out.append(
                EngineSlots(
                    engine_id=state.id,
                    base_model=base,
                    max_loras=max_loras_of(state, self.default_max_loras),
                    max_cpu_loras=self.max_cpu_loras,
                    loaded=loaded,
                    loading=self.loading(state.id),
                    healthy=state.healthy and state.routable(),
                    load=float(snap.load),
                    last_used={a: last_used[a] for a in loaded if a in last_used},
                    active=snap.running_adapters,
                    blocked=blocked.get(state.id, frozenset()),
                    preloaded=frozenset(
                        a
                        for a in self._preloaded.get(state.id, ())
                        if a in loaded and a not in last_used
                    ),
                )
            )
        return out


@dataclass(slots=True)
class LoadFailure:
    """The last refused or failed load of ``spec`` on one engine, and when to try again."""

    spec: AdapterSpec
    error: GatewayError
    failures: int
    """Failed loads in a row there."""
    retry_at: float
    """Clock seconds before which that engine is not asked again."""


class LoadBackoff:
    """Per (adapter, engine): the last failed load and when the next may be tried.

    :meth:`failed` after a refused (4xx) or failed (5xx, unreachable, timed out, source not
    resolvable) load waits :func:`routing.lora.load_backoff` of the failures in a row;
    :meth:`succeeded` forgets it, as does a changed registration (:meth:`check`,
    :meth:`sync`: the spec no longer the one that failed) or a new one (:meth:`forget`).
    Bounded by :meth:`sync` (registered adapters x present engines). Example::

        backoff.failed(spec, "e1", AdapterRejected("no such adapter", status=404))
        backoff.blocked()  # -> {"e1": frozenset({"sql"})} for the next 5 s
    """

    def __init__(self, *, clock: Callable[[], float], settings: PlacementSettings) -> None:
        self.clock = clock
        self._settings = settings
        self._failures: dict[str, dict[str, LoadFailure]] = {}  # adapter -> engine -> failure

    def failed(self, spec: AdapterSpec, engine_id: str, error: GatewayError) -> LoadFailure:
        self.check(spec)
        held = self._failures.setdefault(spec.name, {})
        last = held.get(engine_id)
        failures = 1 if last is None else last.failures + 1
        retry_at = self.clock() + load_backoff(failures, self._settings)
        held[engine_id] = entry = LoadFailure(spec, error, failures, retry_at)
        return entry

    def succeeded(self, adapter: str, engine_id: str) -> None:
        held = self._failures.get(adapter)
        if held is not None:
            held.pop(engine_id, None)
            if not held:
                del self._failures[adapter]

    def forget(self, adapter: str) -> None:
        """A (re-)registered adapter starts afresh."""
        self._failures.pop(adapter, None)

    def check(self, spec: AdapterSpec) -> None:
        """Forget ``spec``'s failures when they were of another registration (a new source)."""
        held = self._failures.get(spec.name)
        if held is not None and any(f.spec != spec for f in held.values()):
            del self._failures[spec.name]

    def sync(self, adapters: AdapterRegistry, engine_ids: Collection[str]) -> None:
        """Drop the failures of adapters unregistered or changed and of engines gone."""
        for name in list(self._failures):
            spec = adapters.get(name)
            if spec is None:
                del self._failures[name]
                continue
            self.check(spec)
            held = self._failures.get(name)
            if held is None:
                continue
            for gone in [e for e in held if e not in engine_ids]:
                del held[gone]
            if not held:
                del self._failures[name]

    def blocked(self) -> dict[str, frozenset[str]]:
        """Engine id -> the adapters whose loads there back off now."""
        now = self.clock()
        out: dict[str, set[str]] = {}
        for name, held in self._failures.items():
            for engine_id, failure in held.items():
                if failure.retry_at > now:
                    out.setdefault(engine_id, set()).add(name)
        return {engine_id: frozenset(names) for engine_id, names in out.items()}

    def failures(self, adapter: str) -> Mapping[str, LoadFailure]:
        return self._failures.get(adapter, {})

    def refusal(self, adapter: str, engine_ids: Collection[str]) -> GatewayError:
        """The answer for a request of ``adapter`` while every one of ``engine_ids`` backs
        off: the engines' own error (a 4xx first: the adapter itself is at fault), said to
        be remembered, with the time of the next try. A fresh exception per request."""
        held = self.failures(adapter)
        entries = [held[e] for e in engine_ids if e in held] or list(held.values())
        if not entries:  # cannot happen: the caller saw them blocked
            return AdapterLoadFailed(f"adapter `{adapter}` cannot be loaded right now")
        entries.sort(key=lambda f: (not isinstance(f.error, AdapterRejected), -f.retry_at))
        first = entries[0]
        wait = max(0.0, min(f.retry_at for f in entries) - self.clock())
        text = (
            f"adapter `{adapter}` could not be loaded by any engine and is not retried for"
            f" {wait:.0f}s: {first.error.message}"
        )
        error = first.error
        if isinstance(error, AdapterRejected):
            return AdapterRejected(text, status=error.status)
        if isinstance(error, UpstreamTimeout):
            return UpstreamTimeout(text)
        return AdapterLoadFailed(text)

    def describe(self, adapter: str, *, wall: Callable[[], float] = time.time) -> dict[str, Any]:
        """The admin API's view: the last error, when the next load may be tried (Unix
        seconds; None: now) and per engine the failures in a row and the wait left."""
        held = self.failures(adapter)
        if not held:
            return {"last_error": None, "last_status": None, "retry_at": None, "failed_on": {}}
        now, wall_now = self.clock(), wall()
        last = max(held.values(), key=lambda f: f.retry_at)
        waiting = [f.retry_at for f in held.values() if f.retry_at > now]
        return {
            "last_error": last.error.message,
            "last_status": last.error.status,
            "retry_at": round(wall_now + min(waiting) - now, 3) if waiting else None,
            "failed_on": {
                engine_id: {"failures": f.failures, "status": f.error.status,
                            "retry_in_s": round(max(0.0, f.retry_at - now), 3)}
                for engine_id, f in sorted(held.items())
            },
        }  # fmt: skip


def max_loras_of(state: EndpointState, default: int) -> int:
    """The engine's ``vllm:lora_requests_info`` ``max_lora`` when scraped, else ``default``."""
    scraped = state.engine.metrics.max_lora
    return scraped if scraped is not None else default


class LoraActuator:
    """Load/unload calls to engines (see the module docstring)."""

    def __init__(
        self,
        *,
        client: Upstream,
        adapters: AdapterRegistry,
        book: LoraBook,
        settings: LoraSettings,
        metrics: LoraMetrics,
        backoff: LoadBackoff | None = None,
    ) -> None:
        self._client = client
        self._adapters = adapters
        self.book = book
        self.backoff = backoff or LoadBackoff(clock=book.clock, settings=PlacementSettings())
        self._settings = settings
        self._metrics = metrics
        self._limiter = anyio.Semaphore(settings.max_concurrent_ops)
        self._loads: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._ops: dict[tuple[str, str], _OpLock] = {}  # (adapter, engine) -> its call lock
        self._tasks: set[asyncio.Task[None]] = set()  # the loads' tasks (cancelled by aclose)

    @property
    def adapters(self) -> AdapterRegistry:
        """The registry whose specs this actuator loads."""
        return self._adapters

    def pending(self, adapter: str) -> asyncio.Future[None] | None:
        """A load of ``adapter`` in flight on any engine (the first found), else None."""
        for (name, _), future in self._loads.items():
            if name == adapter:
                return future
        return None

    def start_load(
        self,
        state: EndpointState,
        spec: AdapterSpec,
        *,
        reason: str,
        make_room: str | None = None,
    ) -> asyncio.Future[None]:
        """The future of loading ``spec`` on ``state`` (started now, or the one in flight),
        after unloading ``make_room`` there (a failed unload is logged; the load goes on).
        Its result is None on success, else a :class:`GatewayError`; it runs in a task of
        its own, so a waiter giving up never cancels it."""
        key = (spec.name, state.id)
        future = self._loads.get(key)
        if future is not None:
            return future
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._loads[key] = future
        self.book.begin(state, spec.name)

        # From the decision on, no other decision picks the same victim (released once the
        # unload is done, or with the task however it ends).
        release = self.book.leave(state.id, make_room) if make_room else _noop

        async def run() -> None:
            try:
                if make_room is not None:
                    try:
                        await self.unload(state, make_room, reason="make_room")
                    except GatewayError as exc:
                        log.warning("making room on %s failed: %s", state.id, exc.message)
                    finally:
                        release()
                await self.load(state, spec, reason=reason)
            except GatewayError as exc:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: waiters may all have left
            except BaseException as exc:
                if not future.done():
                    future.set_exception(AdapterLoadFailed(f"loading {spec.name} failed"))
                    future.exception()
                if not isinstance(exc, Exception):
                    raise
                log.exception("loading adapter %s on %s crashed", spec.name, state.id)
            else:
                if not future.done():
                    future.set_result(None)
            finally:
                self._loads.pop(key, None)
                self.book.end(state, spec.name)

        task = loop.create_task(run(), name=f"lora-load:{spec.name}@{state.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: release())
        return future

    async def load(self, state: EndpointState, spec: AdapterSpec, *, reason: str) -> None:
        """Load ``spec`` on ``state``: returns on success (or already loaded there), raises
        :class:`AdapterRejected` (the engine's 4xx), :class:`AdapterLoadFailed` (5xx, no
        connection) or :class:`UpstreamTimeout`; the outcome goes to :attr:`backoff`."""
        try:
            async with self._exclusive(spec.name, state.id):
                await self._load(state, spec, reason=reason)
        except GatewayError as exc:
            failure = self.backoff.failed(spec, state.id, exc)
            log.warning("no load of adapter %s on %s for %.0fs (%d failure(s) in a row)",
                        spec.name, state.id, failure.retry_at - self.backoff.clock(),
                        failure.failures)  # fmt: skip
            raise
        self.backoff.succeeded(spec.name, state.id)

    async def _load(self, state: EndpointState, spec: AdapterSpec, *, reason: str) -> None:
        try:
            path = await self._adapters.resolver.lora_path(spec)
        except (OSError, ValueError) as exc:
            self._count("load", reason, "failed")
            raise AdapterLoadFailed(
                f"adapter {spec.name}: cannot resolve its source: {exc}"
            ) from exc
        started = time.perf_counter()
        body = {"lora_name": spec.name, "lora_path": path}
        status, message = await self._call(state, "load", spec.name, body, reason)
        already = status == 400 and "already been loaded" in message
        if status == 200 or already:
            self._metrics.load_duration.observe(time.perf_counter() - started)
            self._count("load", reason, "ok")
            self._listed(state, spec)
            self.book.mark_loaded(state.id, spec.name, preload=reason == "preload")
            log.info("adapter %s loaded on %s (%s)", spec.name, state.id, reason)
            return
        raise self._refused("load", spec.name, state, status, message, reason)

    async def unload(self, state: EndpointState, adapter: str, *, reason: str) -> None:
        """Unload ``adapter`` from ``state``, after our load of it there in flight (bounded
        by ``lora.request_timeout_s``); 404 "cannot be found" counts as done and leaves the
        book to the next reconcile (module docstring)."""
        pending = self._loads.get((adapter, state.id))
        if pending is not None:
            await asyncio.wait({pending}, timeout=self._settings.request_timeout_s)
        release = self.book.leave(state.id, adapter)
        try:
            async with self._exclusive(adapter, state.id):
                status, message = await self._call(
                    state, "unload", adapter, {"lora_name": adapter}, reason
                )
        finally:
            release()
        if status == 404:
            self._count("unload", reason, "ok")
            log.info("adapter %s was not on %s (%s); the next /v1/models decides",
                     adapter, state.id, reason)  # fmt: skip
            return
        if status == 200:
            self._count("unload", reason, "ok")
            state.set_models(card for card in state.models if card.id != adapter)
            self.book.mark_unloaded(state.id, adapter)
            log.info("adapter %s unloaded from %s (%s)", adapter, state.id, reason)
            return
        raise self._refused("unload", adapter, state, status, message, reason)

    async def aclose(self) -> None:
        """Cancel the loads in flight (app shutdown); their futures end with an error."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    # -- internals ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _exclusive(self, adapter: str, engine_id: str) -> AsyncIterator[None]:
        """One load/unload call per (adapter, engine) at a time; the lock is dropped with
        its last user (bounded by the calls in progress)."""
        key = (adapter, engine_id)
        op = self._ops.get(key)
        if op is None:
            op = self._ops[key] = _OpLock(asyncio.Lock())
        op.users += 1
        try:
            async with op.lock:
                yield
        finally:
            op.users -= 1
            if op.users == 0:
                del self._ops[key]

    async def _call(
        self, state: EndpointState, op: str, adapter: str, body: dict[str, Any], reason: str
    ) -> tuple[int, str]:
        url = f"{state.url}/v1/{op}_lora_adapter"
        timeout = self._settings.request_timeout_s
        headers = {"content-type": "application/json", **state.upstream_headers}
        try:
            async with self._limiter:
                with anyio.fail_after(timeout):
                    async with self._client.session().post(
                        url, data=orjson.dumps(body), headers=headers,
                        timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
                    ) as response:  # fmt: skip
                        raw = await response.content.read(MAX_ANSWER)
                        return response.status, _message(raw)
        except TimeoutError as exc:
            self._count(op, reason, "timeout")
            raise UpstreamTimeout(
                f"engine {state.id} did not {op} adapter {adapter} within {timeout:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            self._count(op, reason, "failed")
            raise AdapterLoadFailed(
                f"engine {state.id} unreachable for {op} of adapter {adapter}"
                f" ({type(exc).__name__})"
            ) from exc

    def _refused(
        self, op: str, adapter: str, state: EndpointState, status: int, message: str, reason: str
    ) -> GatewayError:
        text = f"engine {state.id} could not {op} adapter {adapter}: {message or status}"
        log.warning("%s", text)
        if 400 <= status < 500:
            self._count(op, reason, "rejected")
            return AdapterRejected(text, status=status)
        self._count(op, reason, "failed")
        return AdapterLoadFailed(text)

    def _listed(self, state: EndpointState, spec: AdapterSpec) -> None:
        if any(card.id == spec.name for card in state.models):
            return
        card = ModelCard(spec.name, parent=spec.base_model, raw=spec.card())
        state.set_models((*state.models, card))

    def _count(self, op: str, reason: str, outcome: str) -> None:
        self._metrics.operations.labels(op=op, reason=reason, outcome=outcome).inc()


@dataclass(slots=True)
class _OpLock:
    lock: asyncio.Lock
    users: int = 0


def _message(raw: bytes) -> str:
    """The error message of an engine answer (the OpenAI envelope, vLLM's older flat form,
    or plain text), at most 512 characters."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:512]
    if isinstance(doc, dict):
        inner = doc.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:512]
        if isinstance(doc.get("message"), str):
            return str(doc["message"])[:512]
    return raw.decode("utf-8", "replace").strip()[:512]
