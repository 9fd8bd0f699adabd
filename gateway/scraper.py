"""Engine state scraping: every engine's ``/metrics`` -> ``EngineState.observe_metrics``.

A supervised background loop (never on the request path): every ``scrape_interval_s`` it
fetches each engine's Prometheus page concurrently (at most ``scrape_concurrency`` at a
time, each bounded by ``scrape_timeout_s``), parses it with
:func:`routing.parse_vllm_metrics` (vLLM V1 names) and stores it in the engine's
:class:`routing.EngineState`, so policies see ``running``, ``waiting``, ``kv_usage``,
``block_size`` and running adapters in the next snapshot. A failed scrape keeps the last
good values (their age is ``scraped_at``) and counts ``switchyard_scrape_errors_total``.

Each request asks only for :data:`routing.WANTED_SERIES`: ``GET /metrics/?name[]=...``,
Prometheus' series filter. vLLM 0.32 answers ``/metrics`` with the whole page whatever the
query (52 KB for one small model, mostly histogram buckets) but ``/metrics/`` -- its
mounted prometheus_client app -- with just the asked series (4 KB); enginesim does the
same. An engine without that path (404, 405, a redirect, or a 200 page with no ``vllm:``
sample) is asked for ``/metrics`` instead from then on, and the parser picks the same
series out of the whole page. Bodies are asked uncompressed (``accept-encoding:
identity``): prometheus_client gzips when the client accepts it.

Example::

    scraper = MetricsScraper(client=control, endpoints=registry, settings=s.routing, metrics=m)
    await scraper.scrape_once()
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlencode

import aiohttp
import anyio

from gateway.endpoints import EndpointRegistry, EndpointState
from gateway.metrics import GatewayMetrics
from gateway.settings import RoutingSettings
from gateway.upstream import BodyTooLong, Upstream
from routing import WANTED_SERIES, MetricsParseError, parse_vllm_metrics

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 4 * 1024 * 1024
SERIES_FILTER: tuple[tuple[str, str], ...] = tuple(("name[]", n) for n in WANTED_SERIES)
"""The query of a filtered scrape (see the module docstring)."""
_SERIES_QUERY = urlencode(SERIES_FILTER)
_NO_FILTERED_PATH = frozenset({301, 302, 303, 307, 308, 404, 405})


class MetricsScraper:
    """Scrapes every registered engine; see the module docstring."""

    def __init__(
        self,
        *,
        client: Upstream,
        endpoints: EndpointRegistry,
        settings: RoutingSettings,
        metrics: GatewayMetrics,
        filtered: bool = True,
    ) -> None:
        """``filtered=False`` reads every engine's whole ``/metrics`` page, as for an engine
        without the filtered path (benchmarks/routing/scrape_cost.py compares the two)."""
        self._client = client
        self._endpoints = endpoints
        self._settings = settings
        self._metrics = metrics
        self._limiter = anyio.CapacityLimiter(settings.scrape_concurrency)
        self._filtered = filtered
        # Engine ids that showed they have no filtered path (asked for /metrics from then on).
        self._unfiltered: set[str] = set()

    async def run(self) -> None:
        """Scrape forever, one round every ``scrape_interval_s`` (start to start)."""
        interval = self._settings.scrape_interval_s
        while True:
            started = time.monotonic()
            await self.scrape_once()
            await anyio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def scrape_once(self) -> int:
        """Every engine once, concurrently; returns how many were updated."""
        self._unfiltered &= {state.id for state in self._endpoints}  # removed engines
        updated: list[bool] = []
        async with anyio.create_task_group() as tg:
            for state in self._endpoints:
                tg.start_soon(self._limited, state, updated)
        return sum(updated)

    async def _limited(self, state: EndpointState, updated: list[bool]) -> None:
        async with self._limiter:
            updated.append(await self.scrape(state))

    async def scrape(self, state: EndpointState) -> bool:
        """One engine; returns whether its state was updated."""
        timeout = self._settings.scrape_timeout_s
        kind: str | None = None
        try:
            with anyio.fail_after(timeout * 2):
                url, whole = self._filtered_url(state), f"{state.url}/metrics"
                status, body = await self._get(state, url or whole)
                if url is not None and (
                    status in _NO_FILTERED_PATH or (status == 200 and b"vllm:" not in body)
                ):
                    self._unfiltered.add(state.id)
                    log.info("engine %s: no filtered /metrics/ (%s)", state.id, status)
                    status, body = await self._get(state, whole)
            if status != 200:
                kind = f"http_{status}"
            else:
                text = body.decode("utf-8", "replace")
                state.engine.observe_metrics(parse_vllm_metrics(text), at=time.monotonic())
                return True
        except BodyTooLong:
            kind = "too_large"
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = type(exc).__name__
        except MetricsParseError as exc:
            kind = "parse_error"
            log.warning("engine %s: unparsable /metrics: %s", state.id, exc)
        self._metrics.scrape_errors.labels(endpoint=state.id, kind=kind).inc()
        return False

    def _filtered_url(self, state: EndpointState) -> str | None:
        """The engine's filtered-page URL; None when not filtering or it has none."""
        if not self._filtered or state.id in self._unfiltered:
            return None
        return f"{state.url}/metrics/?{_SERIES_QUERY}"

    async def _get(self, state: EndpointState, url: str) -> tuple[int, bytes]:
        return await self._client.get(
            url,
            headers={**state.upstream_headers, "accept-encoding": "identity"},
            timeout_s=self._settings.scrape_timeout_s,
            max_bytes=MAX_METRICS_BYTES,
        )
