"""Observations for the decision loop, from the Kubernetes API and the engines themselves.

:class:`TargetReader` reads what every source needs from the API: the target's scale
(``spec.replicas`` is ``Observation.current``, ``status.selector`` finds its pods) and its
pods (``ready`` from the Ready condition, terminating pods excluded). :class:`PodSource`
is the standalone autoscaler's source: it also scrapes each ready pod's ``/metrics``
(vLLM's names, parsed by :func:`routing.parse_vllm_metrics`) with one bounded HTTP client
(per-scrape timeout, a concurrency cap, a size cap). The gateway-embedded source
(``gateway/autoscaling.py``) reads the same API but takes its signals from the gateway's
own counters instead.

What the standalone source can only estimate (the gateway knows exactly):
``running``/``waiting``/``kv_usage`` are the engines' gauges; TTFT and ITL are the mean of
the histograms' samples since the previous scrape (``None`` when there were none); the
arrival rate is the change of (finished + running + waiting) over the tick, summed over pods
seen at both ends (a request counts when an engine sees it, not when a client sends it);
token rates are the engines' prompt/generation token counters' rates (work done, not work
arrived). ``in_flight``, ``in_flight_tokens`` and ``queued_prompt_tokens`` stay 0.

Staleness (both sources, :class:`Freshness`): a ready pod whose metrics are older than
``stale_after_s`` wall seconds (a pod just turned ready gets that long for its first scrape)
makes the observation ``stale``, and the loop holds. Failed scrapes are reported to
``on_error("metrics")``; API failures raise :class:`autoscale.controller.ObservationError`.

Example::

    source = PodSource(reader=TargetReader(api, target), http=client, clock=WallClock())
    obs = await source.observe()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import anyio
import httpx

from autoscale.clock import Clock
from autoscale.controller import ObservationError
from autoscale.kube import KubeApi, KubeError, PodInfo, Scale, ScaleClient, ScaleTarget, list_pods
from autoscale.signals import EngineSignals, Observation
from routing.metrics_parser import EngineMetrics, MetricsParseError, parse_vllm_metrics

__all__ = ["Freshness", "PodSource", "Reader", "TargetReader", "TargetState", "observation"]

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TargetState:
    """The target's scale and its pods, read in one tick."""

    scale: Scale
    pods: tuple[PodInfo, ...]

    @property
    def ready(self) -> int:
        return sum(1 for p in self.pods if p.ready)


def observation(
    state: TargetState,
    *,
    now: float,
    engines: tuple[EngineSignals, ...],
    rates: tuple[float, float, float],
    stale: bool,
) -> Observation:
    """One tick's Observation: the target's replicas from ``state``, ``rates`` = (arrivals,
    prompt tokens, output tokens) per second."""
    arrival, prompt_rate, output_rate = rates
    return Observation(
        now=now,
        current=state.scale.spec_replicas,
        ready=state.ready,
        engines=engines,
        arrival_rate=arrival,
        prompt_token_rate=prompt_rate,
        output_token_rate=output_rate,
        stale=stale,
    )


class Reader(Protocol):
    """What sources read the target through (:class:`TargetReader`; tests pass fakes)."""

    async def read(self) -> TargetState: ...


class TargetReader:
    """Reads a target's scale and its pods. Example: ``await TargetReader(api, t).read()``."""

    def __init__(self, api: KubeApi, target: ScaleTarget) -> None:
        self.api = api
        self.target = target
        self.scales = ScaleClient(api, target)

    async def read(self) -> TargetState:
        """Raises :class:`ObservationError` (kind ``api``) when the API fails us."""
        try:
            scale = await self.scales.get()
            if scale.selector is None:
                raise ObservationError(f"{self.target}: the scale has no status.selector")
            pods = await list_pods(self.api, self.target.namespace, scale.selector)
        except KubeError as exc:
            raise ObservationError(str(exc), kind="api") from exc
        live = tuple(sorted((p for p in pods if not p.terminating), key=lambda p: p.name))
        return TargetState(scale, live)


class Freshness:
    """Whether every ready pod's metrics are fresh; see the module docstring."""

    def __init__(
        self, stale_after_s: float, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.stale_after_s = stale_after_s
        self._monotonic = monotonic
        self._first_ready: dict[str, float] = {}

    def stale(self, ready: Iterable[str], scraped_at: Mapping[str, float | None]) -> bool:
        """``scraped_at``: each pod's last good scrape (monotonic seconds; None: never)."""
        now = self._monotonic()
        names = list(ready)
        firsts = {name: self._first_ready.get(name, now) for name in names}
        self._first_ready = firsts  # forget pods no longer ready (bounded)
        for name in names:
            last = max(scraped_at.get(name) or firsts[name], firsts[name])
            if now - last > self.stale_after_s:
                return True
        return False


@dataclass(frozen=True, slots=True)
class _Scraped:
    metrics: EngineMetrics
    at: float  # monotonic
    ttft_s: float | None
    itl_s: float | None


def _window_mean(
    new_sum: float, new_count: float, old: EngineMetrics | None, attr: tuple[str, str]
) -> float | None:
    old_sum = getattr(old, attr[0]) if old is not None else 0.0
    old_count = getattr(old, attr[1]) if old is not None else 0.0
    if old is None or new_count < old_count:  # first scrape or a restarted engine
        old_sum, old_count = 0.0, 0.0
    count = new_count - old_count
    return (new_sum - old_sum) / count if count > 0 else None


def _in_system(m: EngineMetrics) -> float:
    return m.requests_finished + m.running + m.waiting


class PodSource:
    """The standalone source: the API for replicas and pods, each pod's ``/metrics``."""

    def __init__(
        self,
        *,
        reader: Reader,
        http: httpx.AsyncClient,
        clock: Clock,
        stale_after_s: float = 5.0,
        scrape_timeout_s: float = 1.0,
        scrape_concurrency: int = 16,
        metrics_path: str = "/metrics",
        port_annotation: str = "switchyard.io/port",
        default_port: int = 8000,
        on_error: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.http = http
        self.clock = clock
        self.scrape_timeout_s = scrape_timeout_s
        self.metrics_path = metrics_path
        self.port_annotation = port_annotation
        self.default_port = default_port
        self._on_error = on_error
        self._monotonic = monotonic
        self._limiter = anyio.CapacityLimiter(scrape_concurrency)
        self._freshness = Freshness(stale_after_s, monotonic=monotonic)
        self._scraped: dict[str, _Scraped] = {}
        self._last_tick: tuple[float, dict[str, EngineMetrics]] | None = None

    async def observe(self) -> Observation:
        state = await self.reader.read()
        ready = [p for p in state.pods if p.ready and p.ip]
        async with anyio.create_task_group() as tg:
            for pod in ready:
                tg.start_soon(self._scrape, pod)
        names = {p.name for p in state.pods}
        self._scraped = {k: v for k, v in self._scraped.items() if k in names}  # bounded
        engines = tuple(self._signals(p) for p in state.pods)
        now = self.clock.now()
        stale = self._freshness.stale(
            (p.name for p in state.pods if p.ready),
            {k: v.at for k, v in self._scraped.items()},
        )
        return observation(state, now=now, engines=engines, rates=self._rates(now), stale=stale)

    def _signals(self, pod: PodInfo) -> EngineSignals:
        scraped = self._scraped.get(pod.name)
        if scraped is None or not pod.ready:
            return EngineSignals(id=pod.name, ready=pod.ready)
        m = scraped.metrics
        return EngineSignals(
            id=pod.name,
            ready=True,
            running=float(m.running),
            waiting=float(m.waiting),
            kv_usage=m.kv_usage if m.has_kv_usage else None,
            ttft_s=scraped.ttft_s,
            itl_s=scraped.itl_s,
        )

    def _rates(self, now: float) -> tuple[float, float, float]:
        """Estimated arrivals and token rates since the previous tick (module docstring)."""
        current = {name: s.metrics for name, s in self._scraped.items()}
        last, self._last_tick = self._last_tick, (now, current)
        if last is None or now <= last[0]:
            return 0.0, 0.0, 0.0
        dt = now - last[0]
        arrived = prompt = output = 0.0
        for name, m in current.items():
            before = last[1].get(name)
            if before is None or m.requests_finished < before.requests_finished:
                continue  # new or restarted engine: no baseline
            arrived += max(0.0, _in_system(m) - _in_system(before))
            prompt += max(0.0, m.prompt_tokens - before.prompt_tokens)
            output += max(0.0, m.generation_tokens - before.generation_tokens)
        return arrived / dt, prompt / dt, output / dt

    async def _scrape(self, pod: PodInfo) -> None:
        host = f"[{pod.ip}]" if pod.ip and ":" in pod.ip else pod.ip
        url = f"http://{host}:{pod.port(self.port_annotation, self.default_port)}"
        url += self.metrics_path
        try:
            async with self._limiter:
                with anyio.fail_after(self.scrape_timeout_s * 2):
                    text = await self._get(url)
            if "vllm:" not in text:
                raise _BadAnswer("no vllm: series on the page")
            metrics = parse_vllm_metrics(text)
        except (httpx.HTTPError, httpx.InvalidURL, TimeoutError, MetricsParseError,
                _BadAnswer) as exc:  # fmt: skip
            log.debug("scrape of %s failed: %s", pod.name, exc)
            if self._on_error is not None:
                self._on_error("metrics")
            return
        old = self._scraped.get(pod.name)
        before = old.metrics if old is not None else None
        ttft = _window_mean(metrics.ttft_sum_s, metrics.ttft_count, before,
                            ("ttft_sum_s", "ttft_count"))  # fmt: skip
        itl = _window_mean(metrics.itl_sum_s, metrics.itl_count, before,
                           ("itl_sum_s", "itl_count"))  # fmt: skip
        self._scraped[pod.name] = _Scraped(metrics, self._monotonic(), ttft, itl)

    async def _get(self, url: str) -> str:
        async with self.http.stream(
            "GET", url, timeout=self.scrape_timeout_s, headers={"accept-encoding": "identity"}
        ) as response:
            if response.status_code != 200:
                raise _BadAnswer(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_METRICS_BYTES:
                    raise _BadAnswer("metrics page too large")
        return body.decode("utf-8", "replace")


class _BadAnswer(Exception):
    """A scrape answered, but not with a usable page."""
