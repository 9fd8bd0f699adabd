"""``switchyard up``: the gateway plus N simulated engines in one process, no other service.

The engines (``enginesim``) and the gateway share one event loop and one task group; the
gateway starts once every engine listens, then prints the exact Python snippet that talks to
it with the official ``openai`` SDK. Ctrl-C stops the gateway, then the engines.

``--redis`` (``make run REDIS=1``) also starts a private ``redis-server`` (no persistence, a
free loopback port, stopped with the gateway) and sets ``redis_url``: keys, limits and
routing state then live there, as they would for replicas.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio

from gateway.runner import build_gateway, first_model, serve_gateway
from gateway.settings import EngineConfig, Settings


def snippet(base_url: str, model: str) -> str:
    """The Python a new user pastes to try the gateway."""
    return f'''from openai import OpenAI

client = OpenAI(base_url="{base_url}/v1", api_key="unused")

reply = client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": "Say hello to Switchyard!"}}],
    max_tokens=32,
)
print(reply.choices[0].message.content)

for chunk in client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": "Count to five."}}],
    max_tokens=32,
    stream=True,
):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
'''


def banner(base_url: str, model: str, engine_urls: list[str], redis_url: str | None = None) -> str:
    engines = "\n".join(f"  engine {i}: {url}" for i, url in enumerate(engine_urls))
    state = f"shared state in Redis at {redis_url}" if redis_url else "in-memory state"
    return (
        f"\nSwitchyard gateway on {base_url}  (simulated engines, {state})\n"
        f"{engines}\n"
        f"  health {base_url}/ready   metrics {base_url}/metrics   models {base_url}/v1/models\n"
        f"\nTry it with the official openai SDK (pip install openai):\n\n"
        f"{snippet(base_url, model)}\n"
        f"Press Ctrl-C to stop.\n"
    )


async def run_up(
    settings: Settings,
    *,
    engines: int,
    profile: str,
    speed: float,
    engine_base_port: int,
    model: str | None,
    redis: bool = False,
) -> None:
    from enginesim.cluster import ClusterConfig, serve_cluster

    cfg = ClusterConfig(
        engines=engines,
        base_port=engine_base_port,
        host="127.0.0.1",
        profile=profile,
        speed=speed,
        model=model,
    )
    urls: list[str] = []
    ready = anyio.Event()

    def on_ready(engine_urls: list[str]) -> None:
        urls.extend(engine_urls)
        ready.set()

    async with anyio.create_task_group() as tg:

        async def run_engines() -> None:
            try:
                await serve_cluster(cfg, on_ready=on_ready)
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(run_engines)
        await ready.wait()
        overrides: dict[str, Any] = {"engines": tuple(EngineConfig(url=u) for u in urls)}
        async with AsyncExitStack() as stack:
            if redis:
                overrides["redis_url"] = await stack.enter_async_context(local_redis())
            full = Settings.model_validate({**settings.model_dump(), **overrides})
            gateway = build_gateway(full)

            async def started(port: int) -> None:
                base_url = f"http://{full.server.host}:{port}"
                served = await first_model(base_url)
                sys.stdout.write(banner(base_url, served or "<model>", urls, full.redis_url))
                sys.stdout.flush()

            await serve_gateway(gateway, on_started=started)
        tg.cancel_scope.cancel()


class RedisNotInstalled(RuntimeError):
    """``--redis`` without a ``redis-server`` on PATH."""


@asynccontextmanager
async def local_redis(*, timeout_s: float = 10.0) -> AsyncIterator[str]:
    """A private ``redis-server`` on a free loopback port for the quickstart; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisNotInstalled(
            "--redis needs redis-server (Debian: apt-get install redis-server; make run "
            "REDIS=1 installs it)"
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--loglevel", "warning"]  # fmt: skip
    process = await anyio.open_process(argv, stdout=None, stderr=None)
    try:
        with anyio.fail_after(timeout_s):
            while True:
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", port)
                except OSError:
                    await anyio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        with anyio.move_on_after(5, shield=True):
            await process.wait()
        if process.returncode is None:
            process.kill()
