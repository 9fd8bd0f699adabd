"""``switchyard serve`` as a user runs it: a subprocess, a config file, reload, Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.gateway.conftest import StartEngines
from tests.gateway.servers import wait_until
from tests.processes import reap

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
SWITCHYARD = str(Path(sys.executable).parent / "switchyard")


def serve_workers(config: Path, workers: int) -> subprocess.Popen[str]:
    """``switchyard serve --workers N`` on a free port; its output on a pipe (see _read_url)."""
    return subprocess.Popen(
        [SWITCHYARD, "serve", "--config", str(config), "--port", "0", "--workers", str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for _ in range(50):  # bounded: the banner is the first line
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        if match:
            return match.group(0)
        if not line and proc.poll() is not None:
            break
    raise AssertionError("no gateway URL printed")


def test_serve_with_config_reload_and_ctrl_c(start_engines: StartEngines, tmp_path: Path) -> None:
    (e0, s0), (e1, s1) = start_engines(2)
    config = tmp_path / "switchyard.yaml"
    config.write_text(f"engines:\n  - url: {s0.url}\n")
    env = {**os.environ, "SWITCHYARD_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [SWITCHYARD, "serve", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = _read_url(proc)
        with httpx.Client(timeout=10) as client:
            first = client.post(f"{url}/v1/chat/completions", json=CHAT)
            assert first.status_code == 200
            assert e0.requests == 1
            config.write_text(f"engines:\n  - url: {s1.url}\n")
            reloaded = client.post(f"{url}/admin/reload").json()
            assert reloaded == {
                "added": [s1.url.removeprefix("http://")],
                "removed": [s0.url.removeprefix("http://")],
            }
            assert client.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200
            assert e1.requests == 1 and e0.requests == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert proc.stdout is not None
        output = proc.stdout.read()
        assert "Traceback" not in output
        logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        access = [r for r in logs if r["logger"] == "switchyard.access"]
        assert any(r["request_id"] == first.headers["x-request-id"] for r in access)
        assert any("POST /v1/chat/completions 200" in r["message"] for r in access)
    finally:
        reap(proc)


def _worker_pids(proc: subprocess.Popen[str], want: int) -> dict[int, int]:
    """Worker index -> pid from the workers' "serving" log lines (bounded read)."""
    assert proc.stdout is not None
    pids: dict[int, int] = {}
    for _ in range(200):
        line = proc.stdout.readline()
        match = re.search(r"worker (\d+) \(pid (\d+)\) serving", line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
            if len(pids) == want:
                return pids
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"workers did not start: {pids}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_workers_share_the_port_restart_and_stop(
    start_engines: StartEngines, tmp_path: Path
) -> None:
    ((engine, srv),) = start_engines(1)
    config = tmp_path / "switchyard.yaml"
    config.write_text(
        f"log_level: INFO\nserver: {{access_log: false}}\nengines:\n  - url: {srv.url}\n"
    )
    proc = serve_workers(config, 2)
    try:
        url = _read_url(proc)
        pids = _worker_pids(proc, 2)
        assert len(set(pids.values())) == 2 and proc.pid not in pids.values()
        for _ in range(20):  # a new connection each time: either worker may accept it
            assert (
                httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
            )
        assert engine.requests == 20
        os.kill(pids[0], signal.SIGKILL)  # the supervisor restarts a dead worker
        restarted = _worker_pids(proc, 1)
        assert restarted[0] != pids[0]
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not _alive(pids[1]) and not _alive(restarted[0])
    finally:
        reap(proc)


def test_workers_die_with_a_killed_supervisor(start_engines: StartEngines, tmp_path: Path) -> None:
    """SIGKILL gives the supervisor no chance to stop its workers: the kernel does
    (PR_SET_PDEATHSIG, gateway.workers.die_with_supervisor), so none keeps the port."""
    ((_engine, srv),) = start_engines(1)
    config = tmp_path / "switchyard.yaml"
    config.write_text(f"log_level: INFO\nengines:\n  - url: {srv.url}\n")
    proc = serve_workers(config, 2)
    pids: dict[int, int] = {}
    try:
        _read_url(proc)
        pids = _worker_pids(proc, 2)
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: not any(_running(pid) for pid in pids.values()), timeout=20)
    finally:
        for pid in pids.values():  # only if the assertion failed: never leave them behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap(proc)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whatever init this machine has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_serve_rejects_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("routing:\n  policy: astrology\n")
    result = subprocess.run(
        [SWITCHYARD, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "astrology" in result.stderr


def test_wait_until_is_bounded() -> None:
    assert wait_until(lambda: False, timeout=0.05) is False


def test_serve_on_a_busy_port_fails_with_one_clear_line(tmp_path: Path) -> None:
    import socket

    config = tmp_path / "s.yaml"
    config.write_text("engines: []\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run(
            [SWITCHYARD, "serve", "--config", str(config), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"switchyard: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_ends_inflight_streams_cleanly(start_engines: StartEngines, tmp_path: Path) -> None:
    ((engine, srv),) = start_engines(1)
    config = tmp_path / "switchyard.yaml"
    config.write_text(f"engines:\n  - url: {srv.url}\nserver:\n  graceful_shutdown_s: 0.5\n")
    proc = subprocess.Popen(
        [SWITCHYARD, "serve", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = _read_url(proc)
        body = {**CHAT, "stream": True, "max_tokens": 100, "fake": {"itl": 0.3}}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                chunks = resp.iter_raw()
                received = next(chunks)
                proc.send_signal(signal.SIGINT)
                received += b"".join(chunks)  # ends when the gateway closes the stream
        events = [line[6:] for line in received.decode().split("\n") if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "shutting_down"
        assert "[DONE]" not in events
        assert proc.wait(timeout=20) == 0
        assert wait_until(lambda: engine.running == 0)  # the engine's slot was freed too
        assert proc.stdout is not None
        output = proc.stdout.read()
        assert "Traceback" not in output and "ERROR" not in output, output
    finally:
        reap(proc)
