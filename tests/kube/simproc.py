"""``switchyard kube-sim`` as a test subprocess, with helpers for its ``/_sim/`` knobs."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes

from tests.processes import Processes, die_with_parent, reap

SWITCHYARD = str(Path(sys.executable).with_name("switchyard"))
START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
_READY = re.compile(r"kube-sim ready (http://127\.0\.0\.1:\d+)")


class KubeSimProcess(Processes):
    """``.url``, ``.kubeconfig``, ``.faults(**knobs)``, ``.set_ready(ns, name, ready)``,
    ``.state()``, ``.api()`` (a ``kubernetes.client.ApiClient``, closed at ``stop``)."""

    def __init__(self, workdir: Path, *, speed: float = 1.0, seed: int = 0,
                 drain_s: float = 30.0, history: int = 2000) -> None:  # fmt: skip
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self.speed = speed
        self.seed = seed
        self.drain_s = drain_s
        self.history = history
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[kubernetes.client.ApiClient] = []

    def start(self) -> KubeSimProcess:
        out, err = self.workdir / "stdout", self.workdir / "stderr"
        argv = [SWITCHYARD, "kube-sim", "--port", "0", "--kubeconfig", str(self.kubeconfig),
                "--speed", str(self.speed), "--seed", str(self.seed),
                "--drain-s", str(self.drain_s), "--history", str(self.history)]  # fmt: skip
        with out.open("wb") as fout, err.open("wb") as ferr:
            self.proc = subprocess.Popen(  # noqa: S603
                argv, stdout=fout, stderr=ferr, preexec_fn=die_with_parent
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _READY.search(out.read_text())
            if match and self.kubeconfig.exists():
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"kube-sim did not start: {err.read_text()[-2000:]}")

    def stop(self) -> None:
        for client in self._clients:
            client.close()  # type: ignore[no-untyped-call]
        self._clients.clear()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            reap(self.proc)
            self.proc = None

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; the exit code (the clean-shutdown test)."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=timeout_s)

    def api(self) -> kubernetes.client.ApiClient:
        client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )
        self._clients.append(client)
        return client

    def faults(self, **knobs: Any) -> dict[str, Any]:
        resp = httpx.put(f"{self.url}/_sim/faults", json=knobs, timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def set_ready(self, namespace: str, name: str, ready: bool | None) -> dict[str, Any]:
        resp = httpx.put(f"{self.url}/_sim/pods/{namespace}/{name}/ready",
                         json={"ready": ready}, timeout=HTTP_TIMEOUT_S)  # fmt: skip
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def state(self) -> dict[str, Any]:
        resp = httpx.get(f"{self.url}/_sim/state", timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def stderr(self) -> str:
        return (self.workdir / "stderr").read_text()
