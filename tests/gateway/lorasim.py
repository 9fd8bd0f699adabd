"""LoRA test helpers: enginesim engines as processes, each behind a counting relay.

``SimEngine`` is one ``python -m enginesim`` process on a fixed port (so it can be killed
and started again on the same port: an engine restart). ``Relay`` is a small ASGI reverse
proxy in front of it, on its own loopback port, that counts the calls by path and can
delay one path (``relay.delay["/v1/load_lora_adapter"] = 2.0``): the gateway talks to the
relay, so a test sees exactly how many load requests reached the engine. It can also hold
the engine's answer on one path until the test releases it (``relay.hold["/v1/models"] =
threading.Event()``; ``relay.held`` counts the answers being held): an answer made before
something the test does next, delivered after it. ``adapter_dir``
makes an adapter directory the engine can "load" (enginesim reads its size).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

from benchmarks.ports import free_port
from tests.gateway.servers import ServerThread, wait_until
from tests.processes import die_with_parent, reap

MODEL = "smollm2"  # the cpu-smollm2 profile's served name (max_loras 2)


def adapter_dir(root: Path, name: str, size: int = 4096) -> Path:
    path = root / f"lora-{name}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (path / "adapter_model.safetensors").write_bytes(b"\0" * size)
    return path


class Relay:
    """ASGI reverse proxy to ``target`` counting ``(method, path)``, delaying paths and
    holding answers."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.calls: Counter[tuple[str, str]] = Counter()
        self.delay: dict[str, float] = {}
        self.hold: dict[str, threading.Event] = {}
        self.held: Counter[str] = Counter()
        self._client: httpx.AsyncClient | None = None

    def count(self, path: str, method: str = "POST") -> int:
        return self.calls[(method, path)]

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        self.calls[(scope["method"], path)] += 1
        pause = self.delay.get(path)
        if pause:
            await asyncio.sleep(pause)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=30.0)
        query = scope.get("query_string", b"").decode()
        url = f"{self.target}{path}" + (f"?{query}" if query else "")
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.lower() != b"host"}
        try:
            resp = await self._client.request(scope["method"], url, content=body,
                                              headers=headers)  # fmt: skip
        except httpx.HTTPError:
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b"relay: engine down"})
            return
        gate = self.hold.get(path)
        if gate is not None:  # the engine has answered; deliver it once the test says so
            self.held[path] += 1
            for _ in range(3000):  # bounded: 30 s
                if gate.is_set():
                    break
                await asyncio.sleep(0.01)
        skip = ("content-length", "transfer-encoding", "connection")
        out = [(k.encode(), v.encode()) for k, v in resp.headers.items() if k.lower() not in skip]
        out.append((b"content-length", str(len(resp.content)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
        await send({"type": "http.response.body", "body": resp.content})


@dataclass
class SimEngine:
    """One enginesim process on ``port`` and its relay (``url``: the relay's)."""

    port: int
    speed: float = 20.0
    relay: Relay = field(init=False)
    server: ServerThread | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.relay = Relay(self.direct)

    @property
    def direct(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def start(self) -> SimEngine:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "enginesim", "--engines", "1", "--base-port",
             str(self.port), "--speed", str(self.speed)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )  # fmt: skip
        proc = self.proc

        def up() -> bool:
            try:
                return httpx.get(f"{self.direct}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        assert wait_until(up, timeout=60) and proc.poll() is None, "enginesim did not start"
        if self.server is None:
            self.server = ServerThread(self.relay).start()
        return self

    def kill(self) -> None:
        if self.proc is not None:
            reap(self.proc)
            self.proc = None

    def stop(self) -> None:
        self.kill()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def adapters(self) -> set[str]:
        """Adapters the engine lists now (asked directly, not through the relay)."""
        data = httpx.get(f"{self.direct}/v1/models", timeout=5).json()["data"]
        return {card["id"] for card in data if card.get("parent")}

    def adapter_roots(self) -> dict[str, str]:
        """Adapter -> the path the engine loaded it from (its card's ``root``)."""
        data = httpx.get(f"{self.direct}/v1/models", timeout=5).json()["data"]
        return {card["id"]: card["root"] for card in data if card.get("parent")}

    def unload_all(self) -> None:
        for name in self.adapters():
            httpx.post(f"{self.direct}/v1/unload_lora_adapter", json={"lora_name": name},
                       timeout=5)  # fmt: skip

    def load(self, name: str, path: Path) -> None:
        """Load by hand, as an operator would (not through the gateway)."""
        r = httpx.post(f"{self.direct}/v1/load_lora_adapter",
                       json={"lora_name": name, "lora_path": str(path)}, timeout=5)  # fmt: skip
        r.raise_for_status()


def start_engines(n: int) -> list[SimEngine]:
    engines: list[SimEngine] = []
    try:
        for _ in range(n):
            engines.append(SimEngine(free_port()).start())
    except BaseException:
        for engine in engines:
            engine.stop()
        raise
    return engines


class FakeKubeApi:
    """The Kubernetes API calls the gateway makes here, on a real socket (for the official
    client): ``GET .../configmaps/{name}`` answers ``data`` (None: 404) or ``status``; pods
    are an empty list, and a pod watch sends one BOOKMARK, then stays open for its
    ``timeoutSeconds`` (or until the client leaves) and ends."""

    def __init__(self) -> None:
        self.data: dict[str, str] | None = None
        self.status = 200
        self.paths: list[str] = []
        self.watch_events = 0
        self.gate: threading.Event | None = None
        """When set to an Event: ConfigMap answers wait until the test sets it."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, query = scope["path"], scope.get("query_string", b"").decode()
        self.paths.append(path)
        if path.endswith("/pods"):
            if "watch" in query:
                await self._watch(query, receive, send)
                return
            else:
                body = orjson.dumps({"kind": "PodList", "items": [],
                                     "metadata": {"resourceVersion": "1"}})  # fmt: skip
            status = 200
        elif self.status != 200 or self.data is None:
            status = self.status if self.status != 200 else 404
            body = orjson.dumps({"kind": "Status", "code": status, "message": "no"})
        else:
            status = 200
            body = orjson.dumps({"kind": "ConfigMap", "metadata": {"name": "loras"},
                                 "data": self.data})  # fmt: skip
        if self.gate is not None and "/configmaps/" in path:
            await _opened(self.gate)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _watch(self, query: str, receive: Any, send: Any) -> None:
        """A pod watch: its headers and one BOOKMARK event at once (the gateway counts it in
        ``switchyard_discovery_events_total{type="bookmark"}``: from then on its watch is
        open and being read, which a shutdown ends cleanly), then nothing until the
        watch's ``timeoutSeconds`` or the client leaves."""
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        timeout = float(params.get("timeoutSeconds", "1"))
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        event = {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                                "metadata": {"resourceVersion": "1"}}}  # fmt: skip
        await send({"type": "http.response.body", "body": orjson.dumps(event) + b"\n",
                    "more_body": True})  # fmt: skip
        self.watch_events += 1
        with anyio.move_on_after(timeout):
            while (await receive())["type"] != "http.disconnect":
                pass
        await send({"type": "http.response.body", "body": b""})


async def _opened(gate: threading.Event) -> None:
    for _ in range(3000):  # bounded: 30 s
        if gate.is_set():
            return
        await asyncio.sleep(0.01)


def write_kubeconfig(path: Path, server: str, namespace: str = "ns") -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{server}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u, namespace: {namespace}}}}}]
current-context: c
""")
    return path
