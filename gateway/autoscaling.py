"""The autoscaler wired into Switchyard: embedded in the gateway, or as its own process.

**Embedded** (``autoscaling.enabled``): :class:`GatewaySource` observes the target through
the gateway's own exact knowledge -- per engine (endpoint id = pod name, as
:mod:`gateway.discovery` registers them) the in-flight requests and tokens, the prompt
tokens sent whose first token has not come back (queued prefill), TTFT/ITL EWMAs, plus the
engines' scraped ``vllm:`` gauges; arrival and token rates from the gateway's
:class:`autoscale.arrivals.ArrivalCounter` (counted once per client request as it enters
the serving path, before any admission wait: :mod:`gateway.routes.proxied`), summed over
every live gateway replica when they share state through Redis
(:meth:`gateway.sharedstate.SharedRoutingState.read_arrivals`; this replica's x the live
replicas, flagged by ``switchyard_autoscaler_arrivals_estimated_ratio``, while Redis is
down). The Kubernetes
API gives ``spec.replicas`` and which pods are ready. :class:`Autoscaler.run` is started as a
supervised task by :class:`gateway.services.Services`, its metrics on the gateway's
registry.

**Standalone** (``switchyard autoscaler --config FILE``): :func:`run_standalone` uses the
pod-scraping :class:`autoscale.sources.PodSource`, a registry of its own served at
``/metrics`` on ``--metrics-port``, and leader election (always on unless disabled in the
config), until SIGINT/SIGTERM; then the lease is released.

Example::

    autoscaler = build_embedded(settings, endpoints=registry, arrivals=router.arrivals,
                                registry=metrics.registry)
    tg.start_soon(supervise, "autoscaler", autoscaler.run)
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio
import httpx
from prometheus_client import CollectorRegistry, Gauge, make_asgi_app

from autoscale.actuator import LIMITS, Actuator
from autoscale.arrivals import ArrivalReader, FleetRateMeter
from autoscale.clock import Clock, ScaledClock, WallClock
from autoscale.controller import Controller, ObservationSource
from autoscale.kube import KubeApi, KubeError, PodInfo, ScaleClient
from autoscale.leader import LeaderElector
from autoscale.metrics import ERROR_KINDS, MAX_REASONS, AutoscalerMetrics
from autoscale.policies import NAMES as POLICY_NAMES
from autoscale.policies import build as build_policy
from autoscale.settings import AutoscalingSettings
from autoscale.signals import EngineSignals, Observation
from autoscale.sources import Freshness, PodSource, Reader, TargetReader, observation
from gateway.endpoints import EndpointRegistry
from gateway.metricspec import Label, MetricSpec
from gateway.server import make_server
from gateway.tasks import supervise
from routing import EndpointSnapshot

__all__ = [
    "Autoscaler",
    "GatewaySource",
    "METRICS",
    "api_for",
    "build_autoscaler",
    "build_embedded",
    "build_standalone",
    "run_standalone",
]

log = logging.getLogger(__name__)

_ENABLED = "`autoscaling.enabled` (or `switchyard autoscaler`)"


def _gauge(name: str, unit: str) -> MetricSpec:
    return MetricSpec(f"switchyard_autoscaler_{name}", "gauge", unit, when=_ENABLED)


METRICS: tuple[MetricSpec, ...] = (
    *(_gauge(f"{n}_replicas", "replicas") for n in ("desired", "recommended", "current", "ready")),
    *(_gauge(f"{n}_ratio", "ratio") for n in ("panic", "leader", "holding")),
    _gauge("arrivals_per_second", "per_second"),
    _gauge("prompt_tokens_per_second", "per_second"),
    MetricSpec("switchyard_autoscaler_arrivals_estimated_ratio", "gauge", "ratio",
               when="autoscaling.enabled"),  # embedded only: GatewaySource's
    _gauge("in_flight_requests", "requests"),
    _gauge("queued_prompt_tokens", "tokens"),
    _gauge("waiting_requests", "requests"),
    MetricSpec("switchyard_autoscaler_decisions_total", "counter", "decisions", (
        Label("policy", values=POLICY_NAMES),
        Label("reason", bound=f"a policy's short snake_case reason; at most {MAX_REASONS}"
              " distinct, later ones count as `other`"),
    ), when=_ENABLED),
    MetricSpec("switchyard_autoscaler_errors_total", "counter", "errors",
               (Label("kind", values=ERROR_KINDS),), when=_ENABLED),
    MetricSpec("switchyard_autoscaler_limited_decisions_total", "counter", "decisions",
               (Label("limit", values=LIMITS),), when=_ENABLED),
    MetricSpec("switchyard_autoscaler_scale_patches_total", "counter", "patches", when=_ENABLED),
)  # fmt: skip
"""The families :class:`autoscale.metrics.AutoscalerMetrics` exports (autoscale/ may not
import the gateway: its value sets are declared there, the specs here)."""


class GatewaySource:
    """Observations from the gateway's registry and arrivals (module docstring)."""

    def __init__(
        self,
        *,
        reader: Reader,
        endpoints: EndpointRegistry,
        arrivals: ArrivalReader,
        clock: Clock,
        model: str | None = None,
        stale_after_s: float = 5.0,
        scraped: bool = True,
        latency_scale: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        estimated: Gauge | None = None,
    ) -> None:
        """``arrivals``: the process's counter, or the shared state's reading of every
        replica's (``estimated`` is set to 1 while that reading is an estimate).
        ``scraped``: the gateway scrapes engines' ``/metrics`` (``routing.scrape_interval_s``
        > 0), so their age is checked; without it only the gateway's own counts are used.
        ``latency_scale`` multiplies the TTFT/ITL the gateway measured (wall seconds): a
        benchmark running engines ``speed`` times faster than wall time passes ``speed`` so
        that policies see simulated seconds, like every other duration they read."""
        self.reader = reader
        self.endpoints = endpoints
        self.arrivals = arrivals
        self.clock = clock
        self.model = model
        self.scraped = scraped
        self.latency_scale = latency_scale
        self._meter = FleetRateMeter()
        self._estimated = estimated
        self._was_estimated = False
        self._warned = False
        self._started = False  # no reading yet
        self._freshness = Freshness(stale_after_s, monotonic=monotonic)
        self._samples: dict[str, tuple[int, int]] = {}
        """Per pod in the pool: (first tokens, output tokens) seen at the last observation."""

    async def observe(self) -> Observation:
        state = await self.reader.read()
        snapshots = {s.id: s for s in self.endpoints.snapshots()}
        scale = self.latency_scale
        samples = self._new_samples(state.pods)
        engines = tuple(
            _signals(p.name, p.ready, snapshots.get(p.name), scale, samples.get(p.name))
            for p in state.pods
        )
        stale = False
        if self.scraped:  # a Ready pod not in the pool contributes its readiness only
            stale = self._freshness.stale(
                (p.name for p in state.pods if p.ready and p.name in snapshots),
                {n: s.scraped_at for n, s in snapshots.items()},
            )
        now = self.clock.now()
        reading = self.arrivals.read_arrivals(self.model)
        rates = self._meter.rates(reading, now=now)
        if reading.estimated != self._was_estimated:
            self._flag(reading.estimated, reading.replicas)
        self._started = True
        return observation(state, now=now, engines=engines, rates=rates, stale=stale)

    def _new_samples(self, pods: Iterable[PodInfo]) -> dict[str, tuple[bool, bool]]:
        """Per pod in the pool: whether a first token and an output token arrived since the
        last observation. The TTFT/ITL EWMAs change only with samples and never fade, so an
        engine without new ones reports no latency (as the standalone source, which reads
        histogram deltas): an idle fleet has no latency pressure, not its last busy one."""
        counts: dict[str, tuple[int, int]] = {}
        for pod in pods:
            endpoint = self.endpoints.get(pod.name)
            if endpoint is not None:
                counts[pod.name] = (endpoint.engine.ttft[1], endpoint.engine.output_tokens_total)
        before, self._samples = self._samples, counts  # bounded: the target's pods
        return {
            name: (ttft > before.get(name, (0, 0))[0], out > before.get(name, (0, 0))[1])
            for name, (ttft, out) in counts.items()
        }

    def _flag(self, estimated: bool, replicas: int) -> None:
        """Arrivals went from counted to estimated or back: the gauge, and a log line (not
        for the first reading, which may come before this replica's first sync)."""
        self._was_estimated = estimated
        if self._estimated is not None:
            self._estimated.set(1 if estimated else 0)
        if estimated and self._started:
            self._warned = True
            log.warning("arrival rates estimated: this replica's x %d live replicas last seen"
                        " (shared routing state unavailable)", replicas)  # fmt: skip
        elif not estimated and self._warned:
            self._warned = False
            log.info("arrival rates counted across every replica again")


def _signals(
    name: str,
    ready: bool,
    snap: EndpointSnapshot | None,
    latency_scale: float,
    fresh: tuple[bool, bool] | None,
) -> EngineSignals:
    """``fresh``: whether a first token / an output token arrived since the last reading
    (the TTFT / ITL is reported only then)."""
    if snap is None:  # not (yet) in the pool: discovery adds it once Ready
        return EngineSignals(id=name, ready=ready)
    new_ttft, new_itl = fresh or (False, False)
    return EngineSignals(
        id=name,
        ready=ready,
        running=float(snap.running),
        waiting=float(snap.waiting),
        kv_usage=snap.kv_usage if snap.scraped_at is not None else None,
        in_flight=snap.in_flight,
        in_flight_tokens=snap.in_flight_tokens,
        queued_prompt_tokens=snap.prefill_tokens,
        ttft_s=None
        if snap.ttft_ewma_s is None or not new_ttft
        else snap.ttft_ewma_s * latency_scale,
        itl_s=None if snap.itl_ewma_s is None or not new_itl else snap.itl_ewma_s * latency_scale,
    )


@dataclass(slots=True)
class Autoscaler:
    """A controller and what it must close. Example: ``await autoscaler.run()``."""

    controller: Controller
    api: KubeApi
    elector: LeaderElector | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def run(self) -> None:
        """The decision loop (and the elector), until cancelled."""
        await self.controller.run()

    async def aclose(self) -> None:
        for close in self.closers:
            await close()
        self.api.close()


def _clock_for(settings: AutoscalingSettings) -> Clock:
    """The wall clock, or a :class:`ScaledClock` when ``time_scale`` is not 1 (simulations)."""
    if settings.time_scale == 1.0:
        return WallClock()
    return ScaledClock(speed=settings.time_scale)


def api_for(settings: AutoscalingSettings) -> KubeApi:
    """The API client of ``settings`` (raises :class:`autoscale.kube.KubeError`)."""
    return KubeApi.from_kubeconfig(
        settings.kubeconfig, context=settings.context, timeout_s=settings.api_timeout_s
    )


def build_autoscaler(
    settings: AutoscalingSettings,
    *,
    source: Callable[[TargetReader, AutoscalerMetrics], ObservationSource],
    registry: CollectorRegistry,
    clock: Clock | None = None,
    api: KubeApi | None = None,
) -> Autoscaler:
    """The controller for ``settings`` with the source ``source(reader, metrics)`` makes.
    Raises :class:`autoscale.kube.KubeError` when no Kubernetes configuration loads, and
    ``ValueError`` for an unknown policy."""
    clock = clock or _clock_for(settings)
    policy = build_policy(settings.policy, settings.policy_settings)
    api = api or api_for(settings)
    target = settings.target.target()
    metrics = AutoscalerMetrics(registry, policy=policy.name)
    elector = None
    election = settings.leader_election
    if election.enabled:
        elector = LeaderElector(
            api,
            name=election.lease_name,
            namespace=settings.lease_namespace,
            identity=election.resolved_identity(),
            lease_duration_s=election.lease_duration_s,
            renew_deadline_s=election.renew_deadline_s,
            retry_period_s=election.retry_period_s,
            release_on_cancel=election.release_on_shutdown,
        )
    controller = Controller(
        source=source(TargetReader(api, target), metrics),
        policy=policy,
        actuator=Actuator(settings.limits(), ScaleClient(api, target)),
        metrics=metrics,
        elector=elector,
        clock=clock,
        interval_s=settings.interval_s,
        max_backoff_s=settings.max_backoff_s,
        patch_timeout_s=settings.api_timeout_s,
        target=str(target),
    )
    return Autoscaler(controller, api, elector)


def build_embedded(
    settings: AutoscalingSettings,
    *,
    endpoints: EndpointRegistry,
    arrivals: ArrivalReader,
    registry: CollectorRegistry,
    scraped: bool = True,
    clock: Clock | None = None,
    api: KubeApi | None = None,
    latency_scale: float | None = None,
) -> Autoscaler:
    """The gateway-embedded autoscaler (:class:`GatewaySource`). ``clock`` and
    ``latency_scale`` default to the settings' ``time_scale`` (compressed time, see there)."""
    clock = clock or _clock_for(settings)
    if latency_scale is None:
        latency_scale = settings.time_scale
    estimated = Gauge(
        "switchyard_autoscaler_arrivals_estimated_ratio",
        "1 while arrival rates are this replica's x the live replicas last seen (shared"
        " routing state unavailable), 0 while counted across every replica",
        registry=registry,
    )

    def source(reader: TargetReader, _metrics: AutoscalerMetrics) -> ObservationSource:
        return GatewaySource(
            reader=reader,
            endpoints=endpoints,
            arrivals=arrivals,
            clock=clock,
            model=settings.model,
            stale_after_s=settings.stale_after_s,
            scraped=scraped,
            latency_scale=latency_scale,
            estimated=estimated,
        )

    return build_autoscaler(settings, source=source, registry=registry, clock=clock, api=api)


def build_standalone(
    settings: AutoscalingSettings,
    *,
    registry: CollectorRegistry,
    clock: Clock | None = None,
    api: KubeApi | None = None,
) -> Autoscaler:
    """The standalone autoscaler (:class:`autoscale.sources.PodSource`, its own HTTP client)."""
    clock = clock or _clock_for(settings)
    api = api or api_for(settings)  # the one step that may fail: before the client exists
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.scrape_timeout_s),
        limits=httpx.Limits(
            max_connections=settings.scrape_concurrency,
            max_keepalive_connections=settings.scrape_concurrency,
        ),
        trust_env=False,
    )

    def source(reader: TargetReader, metrics: AutoscalerMetrics) -> ObservationSource:
        return PodSource(
            reader=reader,
            http=http,
            clock=clock,
            stale_after_s=settings.stale_after_s,
            scrape_timeout_s=settings.scrape_timeout_s,
            scrape_concurrency=settings.scrape_concurrency,
            metrics_path=settings.metrics_path,
            port_annotation=settings.port_annotation,
            default_port=settings.default_port,
            on_error=metrics.error,
        )

    autoscaler = build_autoscaler(settings, source=source, registry=registry, clock=clock, api=api)
    autoscaler.closers.append(http.aclose)
    return autoscaler


async def run_standalone(
    settings: AutoscalingSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 9091,
    on_started: Callable[[int], None] | None = None,
) -> None:
    """``switchyard autoscaler``: the loop plus ``/metrics`` until SIGINT/SIGTERM."""
    problem = settings.standalone_problem()
    if problem:
        raise ValueError(problem)
    registry = CollectorRegistry()
    sock = socket.create_server((host, port))  # OSError (port in use): exit 1, named
    try:
        try:
            autoscaler = build_standalone(settings, registry=registry)
        except KubeError as exc:
            raise RuntimeError(str(exc)) from exc
        try:
            await _serve(autoscaler, registry, sock, host=host, port=port, on_started=on_started)
        finally:
            with anyio.CancelScope(shield=True):
                await autoscaler.aclose()
    finally:
        sock.close()


async def _serve(
    autoscaler: Autoscaler,
    registry: CollectorRegistry,
    sock: socket.socket,
    *,
    host: str,
    port: int,
    on_started: Callable[[int], None] | None,
) -> None:
    """The loop and ``/metrics`` on ``sock`` until a signal (then the lease is released)."""
    server = make_server(make_asgi_app(registry), host=host, port=port)
    server.config.lifespan = "off"
    async with anyio.create_task_group() as tg:

        async def serve_metrics() -> None:
            try:
                await server.serve(sockets=[sock])
            finally:
                tg.cancel_scope.cancel()  # the server is done: so is the autoscaler

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal %d: stopping the autoscaler", signum)
                    server.should_exit = True
                    return

        tg.start_soon(stop_on_signal)
        tg.start_soon(serve_metrics)
        tg.start_soon(supervise, "autoscaler", autoscaler.run)
        if on_started is not None:
            on_started(int(sock.getsockname()[1]))
