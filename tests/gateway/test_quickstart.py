"""The README quickstart as a new user runs it: ``switchyard up``, then the printed snippet."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.gateway.test_cli import SWITCHYARD
from tests.processes import reap


def _banner(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    for _ in range(200):  # bounded: the banner is a few dozen lines
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            return "".join(lines)
    raise AssertionError("no banner:\n" + "".join(lines))


def test_up_prints_a_snippet_that_works_and_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [SWITCHYARD, "up", "--port", "0", "--engines", "2", "--speed", "20"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        banner = _banner(proc)
        assert re.search(r"Switchyard gateway on http://127\.0\.0\.1:\d+", banner)
        snippet = banner[banner.index("from openai import OpenAI") : banner.index("Press Ctrl-C")]
        assert "<model>" not in snippet
        script = tmp_path / "snippet.py"
        script.write_text(snippet)
        run = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        reply, streamed = run.stdout.strip().split("\n")[:2]
        assert reply.strip() and streamed.strip()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)
        log.close()
    assert "Traceback" not in (tmp_path / "up.log").read_text()


def test_up_with_redis_runs_its_own_redis_and_stops_it(tmp_path: Path) -> None:
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [SWITCHYARD, "up", "--port", "0", "--engines", "1", "--speed", "20", "--redis"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        banner = _banner(proc)
        match = re.search(r"shared state in Redis at redis://127\.0\.0\.1:(\d+)/0", banner)
        assert match, banner
        gateway = re.search(r"http://127\.0\.0\.1:\d+", banner)
        assert gateway is not None
        ready = httpx.get(f"{gateway.group(0)}/ready", timeout=10).json()
        assert ready["redis"]["status"] == "up" and ready["redis"]["replicas"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        with socket.socket() as sock:  # the private redis-server went with the gateway
            assert sock.connect_ex(("127.0.0.1", int(match.group(1)))) != 0
    finally:
        reap(proc)
        log.close()
    assert "Traceback" not in (tmp_path / "up.log").read_text()
