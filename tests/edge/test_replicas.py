"""Two real gateway processes (``switchyard serve``) sharing one real redis-server, in front
of simulated vLLM engines (``python -m enginesim``): limits hold across replicas, a Redis
outage degrades to local fair-share limits and recovers without a restart.

Counts are what the engines report having served (``vllm:request_success_total``,
``vllm:prompt_tokens_total`` + ``vllm:generation_tokens_total``), not only what the gateway
answered.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from benchmarks.ports import free_port_block
from tests.gateway.servers import wait_until
from tests.processes import die_with_parent, reap
from tests.redis_server import RedisServer

SWITCHYARD = str(Path(sys.executable).parent / "switchyard")
MODEL = "smollm2"
RPM_KEY = "sk-edge-rpm-0123456789"
TPM_KEY = "sk-edge-tpm-0123456789"
OUTAGE_KEY = "sk-edge-outage-0123456"
ADMIN_KEY = "sk-edge-admin-01234567"
RPM, TPM, OUTAGE_RPM = 100, 10_000, 40
# The replicas' shared routing state (gateway/sharedstate.py): each one heartbeats at its
# first sync, made as its lifespan starts (before it prints its URL), then every
# SYNC_INTERVAL_S; it counts the replicas heard from within liveness = max(1 s, 5 intervals);
# a link that timed out under load is probed again every RETRY_S. So both count 2 within
# about LIVENESS_S + RETRY_S of the second one's start; the wait allows 30x that (as long as
# the two 30 s waits it replaces): on a loaded host each /ready poll may itself take seconds.
SYNC_INTERVAL_S, RETRY_S = 0.05, 1.0
LIVENESS_S = max(1.0, 5 * SYNC_INTERVAL_S)
FLEET_WAIT_S = 30 * (LIVENESS_S + RETRY_S)


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Fleet:
    redis: RedisServer
    engines: list[str]
    replicas: list[Replica]


def _served(engines: list[str]) -> tuple[float, float]:
    """(requests finished, prompt + generated tokens) summed over the engines."""
    requests = tokens = 0.0
    for url in engines:
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            name = line.split("{", 1)[0]
            if name == "vllm:request_success_total":
                requests += float(line.rsplit(" ", 1)[1])
            elif name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
                tokens += float(line.rsplit(" ", 1)[1])
    return requests, tokens


def _start_replica(config: Path, log: Path) -> Replica:
    out = log.open("wb")
    proc = subprocess.Popen(  # noqa: S603
        [SWITCHYARD, "serve", "--config", str(config), "--port", "0"],
        stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )  # fmt: skip
    out.close()
    found: list[str] = []

    def announced() -> bool:
        match = re.search(r"http://127\.0\.0\.1:\d+", log.read_text(errors="replace"))
        if match:
            found.append(match.group(0))
        return bool(found) or proc.poll() is not None

    assert wait_until(announced, timeout=60) and found, log.read_text(errors="replace")[-2000:]
    return Replica(found[0], proc, log)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("edge")
    base = free_port_block(2)  # both engines' ports (a kernel pick's neighbour may be taken)
    sim = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "enginesim", "--engines", "2", "--base-port", str(base),
         "--speed", "50"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )  # fmt: skip
    engines = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
    replicas: list[Replica] = []
    with RedisServer() as redis:
        try:
            for url in engines:
                assert wait_until(lambda u=url: _up(u), timeout=60), "enginesim did not start"
            config: dict[str, Any] = {
                "log_level": "WARNING",
                "redis_url": redis.url,
                "admin_key": ADMIN_KEY,
                "api_keys": [
                    {"key": RPM_KEY, "rpm": RPM},
                    {"key": TPM_KEY, "tpm": TPM},
                    {"key": OUTAGE_KEY, "rpm": OUTAGE_RPM},
                ],
                "engines": [{"url": url} for url in engines],
                "server": {"access_log": False},
                "health": {"interval_s": 0.2, "fail_threshold": 2, "success_threshold": 1},
                "routing": {"policy": "least-request"},
                "redis": {"sync_interval_s": SYNC_INTERVAL_S, "retry_s": RETRY_S},
            }
            path = tmp / "switchyard.yaml"
            path.write_text(yaml.safe_dump(config))
            replicas = [_start_replica(path, tmp / f"gw{i}.log") for i in range(2)]
            _wait_for_each_other(replicas)
            yield Fleet(redis, engines, replicas)
        finally:
            for replica in replicas:
                reap(replica.proc)
            reap(sim)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _ready(replica: Replica) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{replica.url}/ready", timeout=5).json()
    return body


def _wait_for_each_other(replicas: list[Replica]) -> None:
    """Until every replica counts them all (bounded, see FLEET_WAIT_S). A /ready poll that
    times out on a loaded host is polled again; a replica that exited, or the bound, fails
    with what each replica's /ready said and the end of its log."""
    seen: dict[str, Any] = {}

    def everyone() -> bool:
        for replica in replicas:
            assert replica.proc.poll() is None, _fleet_report(replicas, seen)
            try:
                seen[replica.url] = _ready(replica).get("redis")
            except httpx.TransportError as exc:
                seen[replica.url] = repr(exc)
        return all(
            isinstance(shared, dict) and shared.get("replicas") == len(replicas)
            for shared in seen.values()
        )

    assert wait_until(everyone, timeout=FLEET_WAIT_S, interval=0.1), _fleet_report(replicas, seen)


def _fleet_report(replicas: list[Replica], seen: dict[str, Any]) -> str:
    return "\n".join(
        f"{r.url} (exit {r.proc.poll()}): /ready redis {seen.get(r.url)}\n"
        f"{r.log.read_text(errors='replace')[-1500:]}"
        for r in replicas
    )


async def _burst(fleet: Fleet, key: str, n: int, body: dict[str, Any]) -> list[httpx.Response]:
    """``n`` concurrent requests, alternating over the replicas (client-side round-robin)."""
    out: list[httpx.Response] = []
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            url = fleet.replicas[i % len(fleet.replicas)].url + "/v1/completions"
            out.append(await client.post(url, json=body, headers=headers))

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
    return out


def _completion(max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello world", "max_tokens": max_tokens,
            "ignore_eos": True}  # fmt: skip


def test_two_replicas_share_the_rpm_limit(fleet: Fleet) -> None:
    before = _served(fleet.engines)
    responses = anyio.run(_burst, fleet, RPM_KEY, 200, _completion(4))
    ok = [r for r in responses if r.status_code == 200]
    denied = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(denied) == 200
    served = _served(fleet.engines)[0] - before[0]
    # Exact across both replicas: never over the limit, within 5 % under it.
    assert RPM * 0.95 <= len(ok) <= RPM
    assert served == len(ok)
    for r in ok:
        assert r.headers["x-ratelimit-limit-requests"] == str(RPM)
        assert int(r.headers["x-ratelimit-remaining-requests"]) >= 0
        assert r.headers["x-ratelimit-reset-requests"]
    for r in denied:
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
        assert int(r.headers["retry-after-ms"]) > 0 and int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert RPM_KEY not in r.text


def test_two_replicas_share_the_tpm_limit_by_what_engines_served(fleet: Fleet) -> None:
    before = _served(fleet.engines)
    responses = anyio.run(_burst, fleet, TPM_KEY, 200, _completion(100))
    ok = [r for r in responses if r.status_code == 200]
    assert 0 < len(ok) < 200
    served_tokens = _served(fleet.engines)[1] - before[1]
    reported = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert served_tokens == reported
    assert TPM * 0.95 <= served_tokens <= TPM * 1.05
    for r in responses:
        assert "x-ratelimit-limit-tokens" in r.headers


def test_redis_outage_local_fair_share_then_shared_again(fleet: Fleet) -> None:
    fleet.redis.stop()
    try:
        # Both replicas notice (a call fails or the probe does) and say so in /ready.
        for replica in fleet.replicas:
            assert wait_until(
                lambda r=replica: _ready(r)["redis"]["status"] == "degraded", timeout=10
            )
        before = _served(fleet.engines)[0]
        responses = anyio.run(_burst, fleet, OUTAGE_KEY, 2 * OUTAGE_RPM, _completion(2))
        ok = [r for r in responses if r.status_code == 200]
        # Each replica enforces its fair share (limit / 2 replicas) alone: still served,
        # still limited.
        assert len(ok) == OUTAGE_RPM
        assert _served(fleet.engines)[0] - before == len(ok)
        metrics = httpx.get(f"{fleet.replicas[0].url}/metrics", timeout=5).text
        assert "switchyard_redis_healthy_ratio 0.0" in metrics
    finally:
        fleet.redis.start()
    for replica in fleet.replicas:
        assert wait_until(lambda r=replica: _ready(r)["redis"]["status"] == "up", timeout=15)
    # Shared again, without a restart: the restarted Redis (no persistence) starts an empty
    # window, and both replicas together admit the whole limit once, not twice.
    assert all(replica.proc.poll() is None for replica in fleet.replicas)
    responses = anyio.run(_burst, fleet, OUTAGE_KEY, 2 * OUTAGE_RPM, _completion(2))
    assert sum(r.status_code == 200 for r in responses) == OUTAGE_RPM
