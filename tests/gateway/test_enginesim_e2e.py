"""End to end: the official ``openai`` SDK -> the gateway -> simulated vLLM engines.

Each engine is its own ``python -m enginesim`` process (so a test can kill one); the gateway
runs in a thread on a free port. Nothing of ours is mocked.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import openai
import orjson
import pytest

from benchmarks.ports import free_port
from gateway.app import create_app
from tests.gateway.conftest import gateway_settings
from tests.gateway.servers import ServerThread, wait_until

MODEL = "smollm2"


@dataclass
class SimEngine:
    url: str
    proc: subprocess.Popen[bytes]

    def running(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("vllm:num_requests_running")
        )

    def faults(self, **faults: object) -> None:
        httpx.post(f"{self.url}/admin/faults", json=faults, timeout=5).raise_for_status()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def _start_engine(speed: float) -> SimEngine:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "enginesim", "--engines", "1", "--base-port", str(port),
         "--speed", str(speed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    engine = SimEngine(f"http://127.0.0.1:{port}", proc)

    def healthy() -> bool:
        try:
            return httpx.get(f"{engine.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    assert wait_until(healthy, timeout=60) and proc.poll() is None, "enginesim did not start"
    return engine


@dataclass
class Cluster:
    engines: list[SimEngine]
    gateway: ServerThread

    @property
    def base_url(self) -> str:
        return f"{self.gateway.url}/v1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    engines = [_start_engine(speed=10.0) for _ in range(3)]
    try:
        settings = gateway_settings(
            [e.url for e in engines],
            health={"interval_s": 0.2, "fail_threshold": 2, "success_threshold": 1},
            routing={"policy": "least-request"},
        )
        with ServerThread(create_app(settings)) as gw:
            yield Cluster(engines, gw)
    finally:
        for engine in engines:
            if engine.proc.poll() is None:
                engine.proc.terminate()
                engine.proc.wait(timeout=15)


def _sdk(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)


def test_sdk_sync_chat_completions_models(cluster: Cluster) -> None:
    with _sdk(cluster) as client:
        models = [m.id for m in client.models.list()]
        assert MODEL in models
        # extra_body: vLLM extras are merged into the JSON and must reach the engine.
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert chat.object == "chat.completion" and chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens == 8
        comp = client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=5, extra_body={"ignore_eos": True}
        )
        assert comp.object == "text_completion" and comp.choices[0].text


def test_sdk_sync_streaming_with_include_usage(cluster: Cluster) -> None:
    with _sdk(cluster) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_sdk_typed_errors(cluster: Cluster) -> None:
    with _sdk(cluster) as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        assert not_found.value.code == "model_not_found"
        assert not_found.value.request_id and not_found.value.request_id.startswith("req_")
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, messages=[])
        assert bad.value.param == "messages"
        # An engine-side 400 (vLLM validation) passes through as the same typed error.
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**9
            )


@pytest.mark.anyio
async def test_sdk_async(cluster: Cluster) -> None:
    async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0) as client:
        models = await client.models.list()
        assert MODEL in [m.id async for m in models]
        results: list[str] = []

        async def one(i: int) -> None:
            chat = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4
            )
            results.append(chat.choices[0].finish_reason)

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
        assert len(results) == 6 and set(results) <= {"stop", "length"}
        stream = await client.completions.create(
            model=MODEL, prompt="x", max_tokens=6, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="x")


def test_client_disconnect_frees_the_engine_slot(cluster: Cluster) -> None:
    # ignore_eos: without it a sampled EOS could end the request within a few hundred tokens
    # (under a second at speed 10), before the running gauge is read.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}],
            "max_tokens": 1500, "stream": True, "ignore_eos": True}  # fmt: skip
    assert wait_until(lambda: sum(e.running() for e in cluster.engines) == 0)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{cluster.base_url}/chat/completions", json=body) as resp:
            chunks = resp.iter_raw()
            next(chunks)
            # The first chunk (the role delta) can precede the step that schedules the
            # request, so the gauge may trail it; the stream stays open meanwhile.
            assert wait_until(lambda: sum(e.running() for e in cluster.engines) == 1)
    # The connection is closed: the gateway cancels upstream and the engine aborts.
    assert wait_until(lambda: sum(e.running() for e in cluster.engines) == 0, timeout=15)


def _open_stream(port: int, body: bytes) -> socket.socket:
    """A raw client connection with one streaming request, read up to its first event."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    seen = b""
    while b"data: " not in seen:
        data = sock.recv(65536)
        assert data, f"the gateway closed the stream before its first event: {seen!r}"
        seen += data
    return sock


def test_dropped_concurrent_streams_all_abort_upstream(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """32 clients go away at once, mid-stream: every engine's running count returns to 0 (the
    gateway aborted every upstream stream), the gateway holds nothing in flight, and nothing
    floods the log (asyncio's "socket.send() raised exception" when writing to dead sockets)."""
    n = 32
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "long"}],
         "max_tokens": 1500, "stream": True, "ignore_eos": True}
    )  # fmt: skip
    assert wait_until(lambda: sum(e.running() for e in cluster.engines) == 0)
    for engine in cluster.engines:  # streams of a minute or more: only an abort ends them soon
        engine.faults(slowdown=20.0)
    try:
        socks = [_open_stream(cluster.gateway.port, body) for _ in range(n)]
        try:
            assert wait_until(lambda: sum(e.running() for e in cluster.engines) == n, timeout=20)
        finally:
            for sock in socks:  # all at once (a reset), without reading the rest
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        assert wait_until(lambda: sum(e.running() for e in cluster.engines) == 0, timeout=15)
    finally:
        for engine in cluster.engines:
            engine.faults(clear=True)
    ready = httpx.get(f"{cluster.gateway.url}/ready", timeout=5).json()
    assert all(engine["in_flight"] == 0 for engine in ready["engines"])
    flood = [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert not flood, f"{len(flood)} send-to-closed-socket warnings"


def test_stream_cut_by_engine_crash_ends_with_one_error_event(cluster: Cluster) -> None:
    for engine in cluster.engines:
        engine.faults(crash_mid_stream_after_tokens=3)
    try:
        with _sdk(cluster) as client:
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=20,
                stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            got: list[str] = []
            with pytest.raises(openai.APIError) as err:
                for chunk in stream:
                    if chunk.choices:
                        got.append(chunk.choices[0].delta.content or "")
            assert "engine" in err.value.message
            assert 0 < len(got) <= 4
    finally:
        for engine in cluster.engines:
            engine.faults(clear=True)


def test_all_engines_dead_gives_503_then_recovers(cluster: Cluster) -> None:
    for engine in cluster.engines:
        engine.faults(dead=True)
    try:
        ready = f"{cluster.gateway.url}/ready"
        assert wait_until(lambda: httpx.get(ready).json()["healthy_engines"] == 0)
        assert httpx.get(ready).status_code == 200  # still ready: it answers the 503s below
        with _sdk(cluster) as client, pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 503
        assert err.value.code == "no_healthy_endpoint"
    finally:
        for engine in cluster.engines:
            engine.faults(clear=True)
    n = len(cluster.engines)
    assert wait_until(lambda: httpx.get(ready).json()["healthy_engines"] == n)


def test_counters_do_not_drift_under_mixed_traffic(cluster: Cluster) -> None:
    url = f"{cluster.base_url}/chat/completions"
    msgs = [{"role": "user", "content": "mixed"}]

    def one(i: int) -> None:
        kind = i % 5
        with httpx.Client(timeout=60) as client:
            if kind == 0:
                client.post(url, json={"model": MODEL, "messages": msgs, "max_tokens": 8})
            elif kind == 1:
                body = {"model": MODEL, "messages": msgs, "max_tokens": 8, "stream": True}
                client.post(url, json=body)
            elif kind == 2:  # disconnect mid-stream
                body = {"model": MODEL, "messages": msgs, "max_tokens": 400, "stream": True,
                        "ignore_eos": True}  # fmt: skip
                with client.stream("POST", url, json=body) as resp:
                    chunks = resp.iter_raw()
                    next(chunks)
            elif kind == 3:
                client.post(url, json={"model": "nope", "messages": msgs})
            else:
                client.post(url, content=b"{broken", headers={"content-type": "application/json"})

    def worker(k: int) -> None:
        for j in range(10):
            one(k * 10 + j)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    metrics_url = f"{cluster.gateway.url}/metrics"

    def gateway_in_flight() -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in httpx.get(metrics_url).text.splitlines()
            if line.startswith("switchyard_proxy_in_flight_requests{")
        )

    assert wait_until(lambda: gateway_in_flight() == 0, timeout=20)
    assert wait_until(lambda: sum(e.running() for e in cluster.engines) == 0, timeout=20)


def test_lora_adapter_loaded_at_runtime_is_listed_and_routed(
    cluster: Cluster, tmp_path: Path
) -> None:
    adapter_dir = tmp_path / "lora-banana"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    holder = cluster.engines[1]
    load = {"lora_name": "banana", "lora_path": str(adapter_dir)}
    httpx.post(f"{holder.url}/v1/load_lora_adapter", json=load, timeout=10).raise_for_status()
    models_url = f"{cluster.base_url}/models"

    def listed() -> dict[str, object]:
        return {m["id"]: m for m in httpx.get(models_url).json()["data"]}

    try:
        assert wait_until(lambda: "banana" in listed())
        assert listed()["banana"]["parent"] == MODEL  # type: ignore[index]
        body = {"model": "banana", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4}  # fmt: skip
        holder_id = holder.url.removeprefix("http://")
        for _ in range(4):
            resp = httpx.post(f"{cluster.base_url}/chat/completions", json=body, timeout=30)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-switchyard-endpoint"] == holder_id
    finally:
        unload = {"lora_name": "banana"}
        httpx.post(f"{holder.url}/v1/unload_lora_adapter", json=unload, timeout=10)
    assert wait_until(lambda: "banana" not in listed())
    with _sdk(cluster) as client, pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="banana", messages=[{"role": "user", "content": "x"}])


def test_engine_killed_mid_run_non_streaming_requests_still_succeed(cluster: Cluster) -> None:
    """Runs last in this module: it kills one of the three engines."""
    statuses: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 48,
            "ignore_eos": True}  # fmt: skip

    def worker() -> None:
        with httpx.Client(timeout=60) as client:
            for _ in range(500):  # bounded; normally stopped much earlier
                if stop.is_set():
                    return
                status = client.post(f"{cluster.base_url}/chat/completions", json=body).status_code
                with lock:
                    statuses.append(status)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    victim = cluster.engines[0]
    try:
        assert wait_until(lambda: len(statuses) >= 6 and victim.running() > 0, timeout=60)
        victim.kill()
        at_kill = len(statuses)
        assert wait_until(lambda: len(statuses) >= at_kill + 30, timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert statuses and set(statuses) == {200}, statuses
    victim_id = victim.url.removeprefix("http://")

    def victim_health() -> str:
        engines = httpx.get(f"{cluster.gateway.url}/ready").json()["engines"]
        return str(next(e["health"] for e in engines if e["id"] == victim_id))

    assert wait_until(lambda: victim_health() == "unhealthy")
    assert httpx.get(f"{cluster.gateway.url}/ready").json()["healthy_engines"] == 2
