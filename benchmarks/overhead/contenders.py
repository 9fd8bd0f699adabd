"""The contenders: how each proxy is started in front of the fake engines.

Every contender runs in its own process group (its CPU and RSS are that group's), is ready
when a real chat completion through it answers 200 (bounded), and is stopped by its PID.
A contender that cannot run here (peer not installed, flag missing) raises :class:`Skip` with
the reason; nothing is faked.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from benchmarks.overhead.procs import LaunchError, Proc, spawn, wait_ready
from benchmarks.ports import free_ports

PEERS_HOME = Path.home() / ".cache" / "switchyard" / "peers"
REPO = Path(__file__).resolve().parents[2]
SWITCHYARD = Path(sys.executable).parent / "switchyard"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PROBE = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


class Skip(RuntimeError):
    """This contender cannot run here; the message says why."""


@dataclass(slots=True)
class Running:
    name: str
    url: str
    proc: Proc
    auth: str | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        self.proc.stop()
        for fn in self.cleanup:
            fn()


Starter = Callable[[Sequence[str], Path], Running]


def _ready(run: Running, timeout_s: float) -> Running:
    headers = {"Authorization": run.auth} if run.auth else None
    try:
        wait_ready(
            run.proc, f"{run.url}/v1/chat/completions", timeout_s=timeout_s, method="POST",
            json=PROBE, headers=headers,
        )  # fmt: skip
    except LaunchError:
        run.stop()
        raise
    return run


def nginx(engines: Sequence[str], logs: Path) -> Running:
    port = free_ports(1)[0]
    root = logs / "nginx"
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"    server {u.removeprefix('http://')};" for u in engines)
    conf = f"""worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/tmp/body;
  proxy_temp_path {root}/tmp/proxy;
  fastcgi_temp_path {root}/tmp/fastcgi;
  uwsgi_temp_path {root}/tmp/uwsgi;
  scgi_temp_path {root}/tmp/scgi;
  keepalive_requests 100000;
  client_max_body_size 16m;
  client_body_buffer_size 64k;
  upstream engines {{
{servers}
    keepalive 64;
    keepalive_requests 100000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://engines;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""
    (root / "nginx.conf").write_text(conf)
    proc = spawn("nginx", [NGINX, "-p", str(root), "-c", str(root / "nginx.conf")], logs)
    return _ready(Running("nginx", f"http://127.0.0.1:{port}", proc), 15)


def _peer_bin(peer: str) -> Path:
    venv = PEERS_HOME / peer / "bin"
    if not (venv / "python").exists():
        raise Skip(f"{peer} not installed in {venv.parent} (run scripts/peers/install.sh)")
    return venv


def rust_router(peer: str) -> Starter:
    def start(engines: Sequence[str], logs: Path) -> Running:
        venv = _peer_bin(peer)
        port, prom = free_ports(2)
        common = [
            "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *engines,
            "--policy", "round_robin", "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(prom),
        ]  # fmt: skip
        if peer == "sglang-router":
            argv = [str(venv / "python"), "-m", "sglang_router.launch_router", *common]
            argv += ["--log-level", "warn"]
        else:
            argv = [str(venv / "vllm-router"), *common, "--log-level", "warning"]
            argv += ["--worker-startup-check-interval", "1"]
        proc = spawn(peer, argv, logs)
        return _ready(Running(peer, f"http://127.0.0.1:{port}", proc), 60)

    return start


def litellm(engines: Sequence[str], logs: Path) -> Running:
    venv = _peer_bin("litellm")
    key = "sk-" + secrets.token_hex(16)  # a weak key (sk-1234) is refused
    config = {
        "model_list": [
            {"model_name": "fake-model",
             "litellm_params": {"model": "openai/fake-model", "api_base": f"{u}/v1",
                                "api_key": "sk-fake"}}
            for u in engines
        ],
        "router_settings": {"routing_strategy": "simple-shuffle", "num_retries": 0},
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": key},
    }  # fmt: skip
    path = logs / "litellm.yaml"
    logs.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    port = free_ports(1)[0]
    argv = [str(venv / "litellm"), "--config", str(path), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]  # fmt: skip
    env = {"LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True", "TELEMETRY": "False"}
    proc = spawn("litellm", argv, logs, env=env)
    run = Running("litellm", f"http://127.0.0.1:{port}", proc, auth=f"Bearer {key}")
    return _ready(run, 120)


@cache
def has_workers_flag(exe: str) -> bool:
    out = subprocess.run(
        [exe, "serve", "--help"], capture_output=True, text=True, timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
    )  # fmt: skip
    return "--workers" in out.stdout


def switchyard(
    policy: str = "round-robin",
    *,
    workers: int = 1,
    exe: Path = SWITCHYARD,
    label: str = "",
    edge: bool = False,
) -> Starter:
    """``edge``: the production edge on (issue 11): a redis-server of its own (its CPU is not
    in the gateway's process group; the table reports the gateway's), ``redis_url`` set, an
    API key with RPM/TPM limits, a tenant with limits, a per-user limit (every request is
    checked against Redis, microbatched), and the routing state shared through Redis.
    The limits are far above what the run sends, so nothing is refused."""
    name = label or (
        "switchyard" + ("-edge" if edge else "") + (f"-w{workers}" if workers > 1 else "")
        + f"-{policy}"
    )  # fmt: skip

    def start(engines: Sequence[str], logs: Path) -> Running:
        if workers > 1 and not has_workers_flag(str(exe)):
            raise Skip(f"{name}: `switchyard serve --help` has no --workers yet")
        port, redis_port = free_ports(2)
        config: dict[str, object] = {
            "log_level": "WARNING",
            "server": {"host": "127.0.0.1", "port": port, "access_log": False},
            "engines": [{"url": u, "models": ["fake-model"]} for u in engines],
            "routing": {"policy": policy},
        }
        auth = None
        cleanup: list[Callable[[], None]] = []
        logs.mkdir(parents=True, exist_ok=True)
        if edge:
            key = "sk-bench-" + secrets.token_hex(16)
            auth = f"Bearer {key}"
            config |= {
                "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                "admin_key": "sk-admin-" + secrets.token_hex(16),
                "api_keys": [{"key": key, "rpm": 10**9, "tpm": 10**12, "tenant": "bench",
                              "user_rpm": 10**9}],
                "tenants": {"bench": {"rpm": 10**9, "tpm": 10**12}},
            }  # fmt: skip
            redis = spawn(
                f"{name}-redis",
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no"],
                logs,
            )  # fmt: skip
            cleanup.append(redis.stop)
        path = logs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [str(exe), "serve", "--config", str(path)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        try:
            proc = spawn(name, argv, logs)
        except BaseException:
            for fn in cleanup:
                fn()
            raise
        run = Running(name, f"http://127.0.0.1:{port}", proc, auth=auth, cleanup=cleanup)
        return _ready(run, 60)

    return start


def switchyard_before(rev: str, policy: str = "round-robin") -> Starter:
    """Switchyard at git revision ``rev``: a temporary worktree, installed (editable) into its
    own venv under ``~/.cache/switchyard/before-<rev>``; the worktree is removed on stop."""
    name = f"switchyard-before-{policy}"

    def start(engines: Sequence[str], logs: Path) -> Running:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", rev],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if sha.returncode != 0:
            raise Skip(f"{name}: unknown revision {rev!r}")
        home = Path.home() / ".cache" / "switchyard" / f"before-{sha.stdout.strip()}"
        tree = logs / "before-worktree"
        git = ["git", "-C", str(REPO), "worktree"]
        subprocess.run([*git, "add", "--detach", str(tree), rev], check=True, capture_output=True,
                       timeout=120)  # fmt: skip

        def remove() -> None:
            subprocess.run([*git, "remove", "--force", str(tree)], capture_output=True,
                           timeout=120)  # fmt: skip

        try:
            py = home / "bin" / "python"
            if not py.exists():
                subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, timeout=300)
            pip = subprocess.run(
                [str(py), "-m", "pip", "install", "-q", "-e", str(tree)],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if pip.returncode != 0:
                raise Skip(f"{name}: pip install -e failed: {pip.stderr[-400:]}")
            run = switchyard(policy, exe=home / "bin" / "switchyard", label=name)(engines, logs)
        except BaseException:
            remove()
            raise
        run.cleanup.append(remove)
        return run

    return start


def catalogue(policies: Sequence[str], before_rev: str | None) -> dict[str, Starter]:
    """Every proxied contender by name (``direct`` is handled by the runner)."""
    out: dict[str, Starter] = {
        "nginx": nginx,
        "sglang-router": rust_router("sglang-router"),
        "vllm-router": rust_router("vllm-router"),
        "litellm": litellm,
    }
    for p in policies:
        out[f"switchyard-{p}"] = switchyard(p)
    out["switchyard-w2-round-robin"] = switchyard("round-robin", workers=2)
    out["switchyard-edge-round-robin"] = switchyard("round-robin", edge=True)
    out["switchyard-edge-w2-round-robin"] = switchyard("round-robin", edge=True, workers=2)
    if before_rev:
        out["switchyard-before-round-robin"] = switchyard_before(before_rev)
    return out
