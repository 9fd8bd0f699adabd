"""The real parts the dashboard test scrapes: a ``prometheus`` server, and a gateway
(``switchyard serve``) with Kubernetes discovery, the embedded autoscaler, API keys with
limits on a real Redis, in front of engine pods of ``switchyard kube-sim``.

Every process is started with ``die_with_parent`` and killed by its ``Popen`` at ``stop``.

>>> with PrometheusServer(workdir, config) as prom:
...     prom.query("up")
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.ports import free_port, free_port_block
from tests.processes import Processes, die_with_parent, reap

SWITCHYARD = str(Path(sys.executable).with_name("switchyard"))
START_TIMEOUT_S = 30.0
_LISTENING = re.compile(r"Switchyard gateway on (http://127\.0\.0\.1:\d+)")


def wait(what: str, probe: Any, timeout_s: float = START_TIMEOUT_S, step_s: float = 0.1) -> Any:
    """Poll ``probe()`` until it returns something truthy (bounded); that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step_s)


class PrometheusServer(Processes):
    """``prometheus`` on a free loopback port, storage in ``workdir``, ``config`` as its
    configuration (a dict written as YAML). ``.query(expr)`` runs an instant query."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (make test installs it)")
        self.binary = binary
        self.workdir = workdir
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10.0)

    def start(self) -> PrometheusServer:
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config))
        log = self.workdir / "prometheus.log"
        argv = [self.binary, f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]  # fmt: skip
        with log.open("wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603
                argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, log.read_text()[-2000:]
            try:
                return self.client.get("/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait("prometheus to be ready", ready)
        return self

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None:
            reap(self.proc)
            self.proc = None

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query at now (an error answer fails)."""
        answer = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", (expr, answer)
        assert answer["data"]["resultType"] == "vector", (expr, answer["data"]["resultType"])
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def get(self, path: str, **params: Any) -> Any:
        answer = self.client.get(path, params=params).json()
        assert answer["status"] == "success", (path, answer)
        return answer["data"]


class GatewayProcess(Processes):
    """``switchyard serve --config <workdir>/switchyard.yaml --port 0``; ``.url``."""

    def __init__(self, workdir: Path, settings: dict[str, Any]) -> None:
        self.workdir = workdir
        self.settings = settings
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        config = self.workdir / "switchyard.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        log = self.workdir / "gateway.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603
                [SWITCHYARD, "serve", "--config", str(config), "--port", "0"],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )  # fmt: skip

        def listening() -> str | None:
            assert self.proc is not None and self.proc.poll() is None, log.read_text()[-3000:]
            match = _LISTENING.search(log.read_text(errors="replace"))
            return match.group(1) if match else None

        self.url = wait("the gateway to listen", listening)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            reap(self.proc)
            self.proc = None

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5.0).text


class EngineSimProcess(Processes):
    """``python -m enginesim --engines N`` on ports ``base..base+N-1``, publishing KV events
    on ``kv_base..`` when ``kv_events``, sharing the KV tier in ``kv_tier`` (a Redis URL:
    ``--kv-tier``) when given; ``.urls``, ``.kv_endpoints``."""

    def __init__(
        self, workdir: Path, engines: int, *, kv_events: bool = False, kv_tier: str | None = None
    ) -> None:
        self.workdir = workdir
        self.kv_tier = kv_tier
        self.base = free_port_block(2 * engines)  # one block: two calls could pick the same
        self.kv_base = self.base + engines if kv_events else 0
        self.urls = [f"http://127.0.0.1:{self.base + i}" for i in range(engines)]
        self.kv_endpoints = (
            [f"tcp://127.0.0.1:{self.kv_base + i}" for i in range(engines)] if kv_events else []
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EngineSimProcess:
        argv = [sys.executable, "-m", "enginesim", "--engines", str(len(self.urls)),
                "--base-port", str(self.base)]  # fmt: skip
        if self.kv_endpoints:
            argv += ["--kv-events", "--kv-events-base-port", str(self.kv_base)]
        if self.kv_tier:
            argv += ["--kv-tier", self.kv_tier]
        log = self.workdir / "enginesim.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603
                argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, log.read_text()[-2000:]
            try:
                return all(httpx.get(f"{u}/health", timeout=1.0).status_code == 200
                           for u in self.urls)  # fmt: skip
            except httpx.TransportError:
                return False

        wait("the simulated engines", healthy)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            reap(self.proc)
            self.proc = None
