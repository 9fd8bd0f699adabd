"""Active health checks: probe every engine's ``/health`` (and refresh its ``/v1/models``).

An engine leaves the pool after ``fail_threshold`` consecutive failures and comes back after
``success_threshold`` consecutive successes; a new engine's first probe decides at once. Model
lists come from ``/v1/models`` (LoRA adapters appear with ``parent`` = base model) so that
``GET /v1/models`` and model validation reflect what healthy engines actually serve.

A probe's model list is dropped when the engine's state changed while it was in flight
(:attr:`EndpointState.version`: a LoRA load or unload updated the model list meanwhile,
:mod:`gateway.lora_actuator`): the engine may have answered before that change, and its
stale list would undo it until the next probe (an unloaded adapter routed to an engine that
answers 404, a loaded one looking absent). The next probe refreshes it.

Example::

    checker = HealthChecker(client=control, endpoints=registry, settings=s.health, metrics=m)
    await checker.check_once()
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import anyio
import orjson

from gateway.endpoints import EndpointRegistry, EndpointState, ModelCard
from gateway.metrics import GatewayMetrics
from gateway.settings import HealthSettings
from gateway.upstream import BodyTooLong, Upstream

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
"""Bigger ``/health`` or ``/v1/models`` answers count as failed probes."""


def parse_model_cards(payload: Any) -> list[ModelCard]:
    """Cards from an OpenAI/vLLM model list; malformed entries are skipped."""
    data = payload.get("data") if isinstance(payload, dict) else None
    cards: list[ModelCard] = []
    for item in data if isinstance(data, list) else []:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            parent = item.get("parent")
            cards.append(
                ModelCard(
                    id=item["id"], parent=parent if isinstance(parent, str) else None, raw=item
                )
            )
    return cards


class HealthChecker:
    """Periodically probes every registered engine; see the module docstring."""

    def __init__(
        self,
        *,
        client: Upstream,
        endpoints: EndpointRegistry,
        settings: HealthSettings,
        metrics: GatewayMetrics,
        max_concurrent_probes: int = 32,
    ) -> None:
        self._client = client
        self._endpoints = endpoints
        self._settings = settings
        self._metrics = metrics
        # Bounded fan-out: a large fleet is probed at most this many engines at a time.
        self._limiter = anyio.CapacityLimiter(max_concurrent_probes)

    async def run(self) -> None:
        """Probe forever, every ``interval_s`` (the caller ran the first round already)."""
        while True:
            await anyio.sleep(self._settings.interval_s)
            await self.check_once()

    async def check_once(self) -> None:
        async with anyio.create_task_group() as tg:
            for state in self._endpoints:
                tg.start_soon(self._limited_probe, state)

    async def _limited_probe(self, state: EndpointState) -> None:
        async with self._limiter:
            await self.probe(state)

    async def probe(self, state: EndpointState) -> None:
        timeout = self._settings.timeout_s
        error: str | None = None
        cards: list[ModelCard] | None = None
        # Also moved by a health change (passive failures): at worst one refresh is skipped.
        version = state.version
        try:
            with anyio.fail_after(timeout * 2):
                headers = state.upstream_headers
                status, _ = await self._client.get(
                    f"{state.url}/health", headers=headers, timeout_s=timeout, max_bytes=MAX_BODY
                )
                if status != 200:
                    error = f"/health returned {status}"
                else:
                    status, body = await self._client.get(
                        f"{state.url}/v1/models",
                        headers=headers,
                        timeout_s=timeout,
                        max_bytes=MAX_BODY,
                    )
                    if status == 200:
                        cards = parse_model_cards(orjson.loads(body))
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, BodyTooLong) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if cards is not None and state.version == version:
            state.set_models(cards)
        elif cards is not None:
            log.debug("engine %s changed during the probe: its model list is not applied", state.id)
        self.apply(state, ok=error is None, error=error)

    def apply(self, state: EndpointState, *, ok: bool, error: str | None = None) -> None:
        """Count one outcome (probe or passive proxy failure) and log/meter a transition."""
        changed = state.record_probe(
            ok,
            fail_threshold=self._settings.fail_threshold,
            success_threshold=self._settings.success_threshold,
            error=error,
        )
        if changed:
            self._metrics.health_transitions.labels(
                endpoint=state.id, state=state.health.value
            ).inc()
            if ok:
                log.info("engine %s is healthy", state.id)
            else:
                log.warning("engine %s is unhealthy: %s", state.id, error)
