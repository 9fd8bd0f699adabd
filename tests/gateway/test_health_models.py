"""Health probes and LoRA calls racing on one engine's model list (real enginesim, real sockets).

A probe's ``/v1/models`` answer made by the engine before a load or unload, but received
after the gateway applied that load or unload, must not bring the old list back. The
engine sits behind a relay (tests/gateway/lorasim.py) that holds the probe's answer until
the test has made the LoRA call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.adapters import AdapterRegistry, AdapterSpec
from gateway.endpoints import EndpointRegistry, EndpointState, ModelCard
from gateway.health import HealthChecker
from gateway.lora_actuator import LoraActuator, LoraBook
from gateway.lora_metrics import LoraMetrics
from gateway.metrics import GatewayMetrics
from gateway.settings import HealthSettings, LoraSettings, Settings
from gateway.upstream import Upstream
from tests.gateway.lorasim import MODEL, SimEngine, adapter_dir, start_engines

MODELS = "/v1/models"


@pytest.fixture(scope="module")
def engine() -> Iterator[SimEngine]:
    (started,) = start_engines(1)
    try:
        yield started
    finally:
        started.stop()


@dataclass
class Rig:
    engine: SimEngine
    state: EndpointState
    checker: HealthChecker
    actuator: LoraActuator
    spec: AdapterSpec

    def listed(self) -> set[str]:
        return {card.id for card in self.state.models if card.parent}

    async def held_probe(self) -> tuple[asyncio.Task[None], threading.Event]:
        """A probe whose ``/v1/models`` answer the engine has made, held by the relay."""
        gate = threading.Event()
        relay = self.engine.relay
        relay.held.clear()
        relay.hold[MODELS] = gate
        probe = asyncio.create_task(self.checker.probe(self.state))
        for _ in range(1000):  # bounded: until the engine's answer is in the relay
            if relay.held[MODELS] == 1:
                break
            await asyncio.sleep(0.01)
        assert relay.held[MODELS] == 1 and not probe.done()
        return probe, gate


@pytest.fixture
async def rig(engine: SimEngine, tmp_path: Path) -> AsyncIterator[Rig]:
    engine.unload_all()
    engine.relay.hold.clear()
    spec = AdapterSpec("sql", MODEL, str(adapter_dir(tmp_path, "sql")))
    reg = EndpointRegistry()
    state = reg.add(engine.url, endpoint_id="e1")
    state.set_models([ModelCard(MODEL)])
    state.record_probe(True, fail_threshold=1, success_threshold=1)
    control = Upstream.for_control(Settings().proxy)
    checker = HealthChecker(
        client=control,
        endpoints=reg,
        settings=HealthSettings(timeout_s=30.0, fail_threshold=1, success_threshold=1),
        metrics=GatewayMetrics.create(reg),
    )
    actuator = LoraActuator(
        client=control,
        adapters=AdapterRegistry(specs=[spec]),
        book=LoraBook(default_max_loras=2),
        settings=LoraSettings(max_loras=2),
        metrics=LoraMetrics.create(CollectorRegistry()),
    )
    try:
        yield Rig(engine, state, checker, actuator, spec)
    finally:
        for gate in engine.relay.hold.values():
            gate.set()
        engine.relay.hold.clear()
        await actuator.aclose()
        await control.aclose()


@pytest.mark.anyio
async def test_a_probe_answered_before_an_unload_does_not_list_the_adapter_again(
    rig: Rig,
) -> None:
    """The stale answer used to put the unloaded adapter back on the engine's list until
    the next probe: requests for it were routed there and answered 404."""
    await rig.actuator.load(rig.state, rig.spec, reason="demand")
    assert rig.listed() == {"sql"}
    probe, gate = await rig.held_probe()  # the engine said: sql is loaded
    await rig.actuator.unload(rig.state, "sql", reason="admin")
    assert rig.engine.adapters() == set() and rig.listed() == set()
    gate.set()
    await probe
    assert rig.listed() == set()  # not the probe's stale "sql"
    assert rig.state.healthy
    rig.engine.relay.hold.clear()
    await rig.checker.probe(rig.state)  # the next probe agrees
    assert rig.listed() == set()


@pytest.mark.anyio
async def test_a_probe_answered_before_a_load_does_not_hide_the_adapter(rig: Rig) -> None:
    """The stale answer used to drop the adapter just loaded from the engine's list: the
    adapter looked loaded nowhere until the next probe."""
    probe, gate = await rig.held_probe()  # the engine said: no adapter
    await rig.actuator.load(rig.state, rig.spec, reason="demand")
    assert rig.engine.adapters() == {"sql"} and rig.listed() == {"sql"}
    gate.set()
    await probe
    assert rig.listed() == {"sql"}  # not the probe's stale empty list
    assert rig.state.healthy
    rig.engine.relay.hold.clear()
    await rig.checker.probe(rig.state)
    assert rig.listed() == {"sql"}


@pytest.mark.anyio
async def test_a_probe_with_nothing_changed_meanwhile_still_refreshes_the_list(
    rig: Rig, tmp_path: Path
) -> None:
    """The guard skips only probes overtaken by a change: a hand load is picked up."""
    rig.engine.load("manual", adapter_dir(tmp_path, "manual"))
    await rig.checker.probe(rig.state)
    assert rig.listed() == {"manual"}
