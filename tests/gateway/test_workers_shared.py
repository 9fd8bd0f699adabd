"""``switchyard serve --workers 2`` with ``redis_url``: each worker is a replica, so both
heartbeat into Redis and share one limit exactly (the kernel hands each new connection to
either worker)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.gateway.conftest import StartEngines
from tests.gateway.servers import wait_until
from tests.gateway.test_cli import CHAT, _read_url, serve_workers
from tests.processes import reap
from tests.redis_server import RedisServer

KEY = "sk-workers-0123456789"


def test_two_workers_are_two_replicas_sharing_one_limit(
    start_engines: StartEngines, redis_server: RedisServer, tmp_path: Path
) -> None:
    ((engine, srv),) = start_engines(1)
    config = tmp_path / "switchyard.yaml"
    config.write_text(
        f"log_level: WARNING\nserver: {{access_log: false}}\nredis_url: {redis_server.url}\n"
        f"api_keys:\n  - {{key: {KEY}, rpm: 10}}\nengines:\n  - url: {srv.url}\n"
    )
    proc = serve_workers(config, 2)
    try:
        url = _read_url(proc)

        def both_workers_seen() -> bool:
            ready = httpx.get(f"{url}/ready", timeout=5).json()
            return bool(ready["redis"]["replicas"] == 2)

        assert wait_until(both_workers_seen, timeout=30)
        answers = [  # a new connection each time: either worker may take it
            httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10,
                       headers={"authorization": f"Bearer {KEY}"}).status_code
            for _ in range(30)
        ]  # fmt: skip
        assert answers.count(200) == 10 and answers.count(429) == 20
        assert engine.requests == 10
    finally:
        reap(proc)
