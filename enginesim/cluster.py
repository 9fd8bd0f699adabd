"""Run N simulated vLLM engines in one process and one event loop.

Each engine is an :class:`~enginesim.core.engine.EngineCore` driven by an
:class:`~enginesim.server.driver.EngineDriver` task, served by its own uvicorn ``Server`` on
``base_port + i`` (``base_port=0``: each engine gets a free port), optionally publishing KV
events on ``kv_events_base_port + i``. :func:`serve_cluster` runs until cancelled and then shuts
every server down cleanly; it installs no signal handlers, so a caller (``switchyard up``, tests)
can run it inside its own task group::

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve_cluster, ClusterConfig(engines=4), on_ready=print))

:func:`start_engine` starts and stops one engine on its own (the emulated Kubernetes API runs
one per pod): an async context manager yielding its :class:`RunningEngine`::

    async with start_engine(ClusterConfig(base_port=0, cold_start_s=2.0), index=3) as eng:
        print(eng.url, eng.runtime.is_ready())
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import anyio
import zmq
from anyio.abc import TaskGroup

from enginesim.core.api import KVEvent
from enginesim.core.engine import EngineCore
from enginesim.core.profile import EngineProfile, load_profile
from enginesim.core.tokenizer import text_piece_ids
from enginesim.server.app import create_engine_app
from enginesim.server.codec import load_codec
from enginesim.server.driver import EngineDriver
from enginesim.server.embedded import EmbeddedServer, embedded_server
from enginesim.server.faults import FaultInjector, Faults
from enginesim.server.kv_events import KVEventPublisher
from enginesim.server.kvtier import DEFAULT_TIER_TTL_S, TierClient
from enginesim.server.listener import RefusableListener
from enginesim.server.metrics import EngineMetrics
from enginesim.server.runtime import EngineRuntime, EngineSpec, TextCodec
from kvcache.blockstore import AsyncRedisBlockStore

__all__ = ["ClusterConfig", "RunningEngine", "serve_cluster", "start_engine"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 8192  # per engine; uvicorn answers 503 beyond it


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """What to run. ``cold_start_s=None`` uses the profile's cold start; 0 starts ready.
    ``tokenizer``: a local ``tokenizer.json`` (or its directory) for exact token counts.

    >>> ClusterConfig(engines=4, base_port=8100, profile="cpu-smollm2", speed=10.0)
    """

    engines: int = 1
    base_port: int = 8100
    host: str = "127.0.0.1"
    profile: str = "cpu-smollm2"
    speed: float = 1.0
    kv_events: bool = False
    kv_events_base_port: int = 5557
    model: str | None = None
    seed: int = 0
    cold_start_s: float | None = 0.0
    faults: Faults = field(default_factory=Faults)
    tokenizer: str | None = None
    log_level: str = "warning"
    # Shared KV tier (docs/kvtier.md): Redis URL of the block index (None: no tier), the TTL
    # of the keys engines write, and the store's per-call timeout.
    kv_tier: str | None = None
    kv_tier_ttl_s: float = DEFAULT_TIER_TTL_S
    kv_tier_timeout_s: float = 1.0
    kv_tier_async: bool = False  # loads beside the batch (vLLM's load_kv_async) vs inside it


@dataclass(frozen=True, slots=True)
class RunningEngine:
    """One started engine: its URL, its KV-event endpoint and its runtime (for tests/tools)."""

    index: int
    url: str
    kv_events_endpoint: str | None
    runtime: EngineRuntime


class _EventSink:
    """Late-bound KV-event target: the publisher is created once the HTTP port is known."""

    def __init__(self) -> None:
        self.publisher: KVEventPublisher | None = None

    def __call__(self, events: Sequence[KVEvent]) -> None:
        if self.publisher is not None:
            self.publisher.publish(events)


@dataclass(slots=True)
class _Engine:
    index: int
    runtime: EngineRuntime
    server: EmbeddedServer
    listener: RefusableListener
    sink: _EventSink
    kv_port: int | None
    stores: tuple[AsyncRedisBlockStore, ...] = ()

    def start(self, tg: TaskGroup) -> None:
        """The engine's background tasks: its driver loop and, with a tier, the writer."""
        tg.start_soon(self.runtime.driver.run)
        if self.runtime.tier is not None:
            tg.start_soon(self.runtime.tier.run)


def _spec(
    cfg: ClusterConfig, profile: EngineProfile, index: int, eos: tuple[int, ...]
) -> EngineSpec:
    cold = profile.cold_start_s if cfg.cold_start_s is None else cfg.cold_start_s
    return EngineSpec(
        served_model_name=cfg.model or profile.model,
        model_root=profile.model,
        max_model_len=profile.max_model_len,
        block_size=profile.block_size,
        max_loras=profile.max_loras,
        cold_start_s=max(0.0, cold),
        eos_token_ids=eos,
        max_num_seqs=profile.max_num_seqs,
        max_num_batched_tokens=profile.max_num_batched_tokens,
        vocab_size=profile.vocab_size,
        engine_index=index,
    )


CodecFactory = Callable[[EngineProfile], TextCodec]


def _build(
    cfg: ClusterConfig, profile: EngineProfile, index: int, tg: TaskGroup, codecs: CodecFactory
) -> _Engine:
    codec = codecs(profile)
    spec = _spec(cfg, profile, index, codec.eos_token_ids)
    tier = None
    stores: tuple[AsyncRedisBlockStore, ...] = ()
    if cfg.kv_tier:
        # Lookups and the background writer each get a store (pool, breaker, error counters).
        lookups, writes = (
            AsyncRedisBlockStore.from_url(cfg.kv_tier, timeout_s=cfg.kv_tier_timeout_s)
            for _ in range(2)
        )
        stores = (lookups, writes)
        tier = TierClient(
            lookups,
            writes,
            model=spec.served_model_name,
            block_size=profile.block_size,
            block_bytes=max(1, round(profile.block_size * profile.kv_bytes_per_token)),
            ttl_s=cfg.kv_tier_ttl_s,
        )
    core = EngineCore(
        profile,
        seed=cfg.seed + index,
        text_token_ids=text_piece_ids(codec),
        hash_model=spec.served_model_name if tier is not None else None,
        kv_tier=tier is not None,
        kv_tier_async=cfg.kv_tier_async,
    )
    metrics = EngineMetrics(
        model_name=spec.served_model_name,
        max_model_len=spec.max_model_len,
        stats_fn=core.stats,
        tier_stats_fn=tier.stats if tier is not None else None,
        gpu_memory_utilization=profile.gpu_memory_utilization,
    )
    faults = FaultInjector(cfg.faults, seed=cfg.seed * 1_000_003 + index)
    sink = _EventSink()
    driver = EngineDriver(
        core,
        speed=cfg.speed,
        metrics=metrics,
        slowdown=lambda: faults.faults.slowdown,
        on_events=sink,
        on_tier_writes=tier.offer if tier is not None else None,
    )
    rt = EngineRuntime(
        spec=spec, codec=codec, driver=driver, metrics=metrics, faults=faults, tier=tier
    )
    port = cfg.base_port + index if cfg.base_port else 0
    server = embedded_server(
        create_engine_app(rt),
        host=cfg.host,
        port=port,
        log_level=cfg.log_level,
        limit_concurrency=MAX_CONNECTIONS,
    )
    listener = RefusableListener(server, faults, tg)
    rt.listener = listener
    kv_port = None
    if cfg.kv_events:
        kv_port = cfg.kv_events_base_port + index if cfg.kv_events_base_port else 0
    return _Engine(index, rt, server, listener, sink, kv_port, stores)


async def _serve(server: EmbeddedServer) -> None:
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise RuntimeError(f"engine server on port {server.config.port} failed to start") from exc


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


async def _wait_started(
    cfg: ClusterConfig,
    engines: list[_Engine],
    tasks: list[asyncio.Task[None]],
    zmq_ctx: zmq.Context[zmq.Socket[bytes]] | None,
) -> list[RunningEngine]:
    with anyio.fail_after(START_TIMEOUT_S):
        while not all(e.server.started for e in engines):
            for t in tasks:
                if t.done():
                    t.result()  # raises the start failure
                    raise RuntimeError("engine server exited during startup")
            await anyio.sleep(0.005)
    running = []
    host = _url_host(cfg.host)
    for e in engines:
        port = e.listener.bind()
        endpoint = None
        if e.kv_port is not None and zmq_ctx is not None:
            kv_target = f"tcp://{host}:{e.kv_port}" if e.kv_port else f"tcp://{host}:*"
            topic = f"kv@{host}:{port}@{e.runtime.spec.served_model_name}"
            pub = KVEventPublisher(zmq_ctx, kv_target, topic=topic)
            e.runtime.kv_publisher = pub
            e.sink.publisher = pub
            endpoint = pub.endpoint
        if e.runtime.faults.faults.refuse_connections:
            e.listener.refuse(None)
        running.append(RunningEngine(e.index, f"http://{host}:{port}", endpoint, e.runtime))
    return running


async def _stop(engines: list[_Engine], tasks: list[asyncio.Task[None]]) -> None:
    for e in engines:
        e.server.should_exit = True
    with anyio.move_on_after(STOP_TIMEOUT_S):
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if not t.done():
            t.cancel()
    for e in engines:
        e.listener.close()
        e.sink.publisher = None
        if e.runtime.kv_publisher is not None:
            e.runtime.kv_publisher.close()
            e.runtime.kv_publisher = None
        for store in e.stores:
            with anyio.move_on_after(STOP_TIMEOUT_S):
                await store.aclose()
        e.stores = ()


async def serve_cluster(
    cfg: ClusterConfig,
    *,
    on_ready: Callable[[list[str]], None] | None = None,
    on_engines: Callable[[list[RunningEngine]], None] | None = None,
    codec_factory: CodecFactory | None = None,
) -> None:
    """Serve ``cfg.engines`` engines until cancelled; ``on_ready`` gets their base URLs.

    ``on_engines`` gets the :class:`RunningEngine` handles (KV endpoints, runtimes);
    ``codec_factory`` replaces the profile's tokenizer (tests).
    """
    if cfg.engines < 1:
        raise ValueError("engines must be >= 1")
    profile = load_profile(cfg.profile)
    async with anyio.create_task_group() as tg:
        codecs = codec_factory or partial(load_codec, tokenizer=cfg.tokenizer)
        engines = [_build(cfg, profile, i, tg, codecs) for i in range(cfg.engines)]
        for e in engines:
            e.start(tg)
        tasks = [asyncio.create_task(_serve(e.server)) for e in engines]
        zmq_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            running = await _wait_started(cfg, engines, tasks, zmq_ctx)
            log.info("enginesim: %d engine(s) ready: %s", len(running), [r.url for r in running])
            if on_engines is not None:
                on_engines(running)
            if on_ready is not None:
                on_ready([r.url for r in running])
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
            raise RuntimeError("an engine server stopped unexpectedly")
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(engines, tasks)
            zmq_ctx.term()
            tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def start_engine(
    cfg: ClusterConfig,
    index: int = 0,
    *,
    profile: EngineProfile | None = None,
    codec_factory: CodecFactory | None = None,
) -> AsyncIterator[RunningEngine]:
    """Start engine ``index`` of ``cfg`` (its port: ``cfg.base_port + index``, 0 = a free
    one), yield its handle, stop it (server, driver, KV publisher) on exit.

    ``cfg.engines`` is ignored; ``profile`` skips loading ``cfg.profile`` again (callers that
    start many engines of one profile); ``codec_factory`` as in :func:`serve_cluster`. Enter and
    exit it in the same task.
    """
    prof = profile if profile is not None else load_profile(cfg.profile)
    codecs = codec_factory or partial(load_codec, tokenizer=cfg.tokenizer)
    zmq_ctx: zmq.Context[zmq.Socket[bytes]] | None = zmq.Context() if cfg.kv_events else None
    try:
        async with anyio.create_task_group() as tg:
            engine = _build(cfg, prof, index, tg, codecs)
            engine.start(tg)
            tasks = [asyncio.create_task(_serve(engine.server))]
            try:
                (running,) = await _wait_started(cfg, [engine], tasks, zmq_ctx)
                yield running
            finally:
                with anyio.CancelScope(shield=True):
                    await _stop([engine], tasks)
                tg.cancel_scope.cancel()
    finally:
        if zmq_ctx is not None:
            zmq_ctx.term()
