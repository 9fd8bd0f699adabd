"""A real Redis Sentinel and a real Redis Cluster on free loopback ports, for one test.

Both run the installed ``redis-server`` (no docker): :class:`RedisSentinel` is one master
and one sentinel process monitoring it (quorum 1, so the sentinel alone decides); the master
may require a password and have a replica to fail over to. :class:`RedisCluster` is three
``--cluster-enabled yes`` masters (no replicas) joined by ``redis-cli --cluster create``,
ready once every node says ``cluster_state:ok``. A master or a node can be stopped (SIGKILL)
and started again on the same port (a cluster node keeps its ``nodes.conf``, so it rejoins
with its slots). Every process starts with :func:`~tests.processes.die_with_parent` and
every wait is bounded.

Example::

    with RedisCluster() as cluster:
        link = RedisLink.from_url(cluster.url, RedisSettings())
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.ports import free_ports
from tests.processes import Processes, die_with_parent, reap

HOST = "127.0.0.1"
START_S = 10.0  # bound of a process's start
CLUSTER_OK_S = 30.0  # bound of a cluster's formation (or recovery)
SERVICE = "mymaster"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (make test installs it)")
    return path


def command(port: int, *args: str, password: str | None = None) -> bytes:
    """One command over a raw socket (RESP), its raw reply: for readiness checks, so a
    fixture needs no client of its own. Raises ``OSError`` when nothing answers."""
    with socket.create_connection((HOST, port), timeout=1.0) as sock:
        if password:
            sock.sendall(_resp(["AUTH", password]))
            if not sock.recv(64).startswith(b"+OK"):
                raise OSError(f"AUTH refused on port {port}")
        sock.sendall(_resp(list(args)))
        data = b""
        while True:
            chunk = sock.recv(65536)
            data += chunk
            if not chunk or _complete(data):
                return data


def _resp(parts: list[str]) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _complete(data: bytes) -> bool:
    """Enough of a reply for the checks here: a simple line, or a whole bulk string."""
    if data[:1] in (b"+", b"-", b":"):
        return data.endswith(b"\r\n")
    if data[:1] == b"$":
        head, _, rest = data.partition(b"\r\n")
        return int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2
    return data.endswith(b"\r\n")  # arrays: good enough for short replies


def _wait(port: int, check: bytes, *args: str, password: str | None = None) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        try:
            if check in command(port, *args, password=password):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"redis on port {port} did not answer {args} with {check!r}")


def _spawn(argv: list[str]) -> subprocess.Popen[Any]:
    return subprocess.Popen(  # noqa: S603
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
    )


class RedisSentinel(Processes):
    """``with RedisSentinel(password="pw") as s: s.url``; ``stop_master()`` /
    ``start_master()`` for an outage of the master (the sentinel keeps running). With
    ``replica=True`` a replica follows the master, so the sentinel can fail over to it."""

    def __init__(self, *, password: str | None = None, replica: bool = False) -> None:
        self.binary = _binary("redis-server")
        self.password = password
        self.master_port, self.sentinel_port, self.replica_port = free_ports(3)
        self.dir = Path(tempfile.mkdtemp(prefix="switchyard-sentinel-"))
        self.master: subprocess.Popen[Any] | None = None
        self.sentinel: subprocess.Popen[Any] | None = None
        self.replica: subprocess.Popen[Any] | None = None
        self.with_replica = replica

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis+sentinel://{auth}{HOST}:{self.sentinel_port}/{SERVICE}/0"

    def _server(self, port: int, *extra: str) -> subprocess.Popen[Any]:
        workdir = self.dir / str(port)  # a replica writes the RDB it receives
        workdir.mkdir(exist_ok=True)
        argv = [self.binary, "--port", str(port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning",
                "--dir", str(workdir), *extra]  # fmt: skip
        if self.password:  # masterauth too: after a failover the old master may follow
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        proc = _spawn(argv)
        _wait(port, b"+PONG", "PING", password=self.password)
        return proc

    def start_master(self) -> None:
        self.master = self._server(self.master_port)

    def stop_master(self) -> None:
        if self.master is not None:
            reap(self.master)
            self.master = None

    def start(self) -> RedisSentinel:
        self.start_master()
        if self.with_replica:  # before the sentinel, whose first INFO then lists it
            self.replica = self._server(self.replica_port, "--replicaof", HOST,
                                        str(self.master_port))  # fmt: skip
            _wait(self.replica_port, b"master_link_status:up", "INFO", "replication",
                  password=self.password)  # fmt: skip
        conf = self.dir / "sentinel.conf"  # the sentinel rewrites it: a file of its own
        lines = [f"port {self.sentinel_port}", f"bind {HOST}", "protected-mode no",
                 f"dir {self.dir}", "loglevel warning",
                 f"sentinel monitor {SERVICE} {HOST} {self.master_port} 1",
                 f"sentinel down-after-milliseconds {SERVICE} 1000",
                 f"sentinel failover-timeout {SERVICE} 5000"]  # fmt: skip
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE} {self.password}")
        conf.write_text("\n".join(lines) + "\n")
        self.sentinel = _spawn([self.binary, str(conf), "--sentinel"])
        _wait(self.sentinel_port, str(self.master_port).encode(),
              "SENTINEL", "get-master-addr-by-name", SERVICE)  # fmt: skip
        if self.with_replica:
            _wait(self.sentinel_port, str(self.replica_port).encode(),
                  "SENTINEL", "replicas", SERVICE)  # fmt: skip
        return self

    def master_addr(self) -> bytes:
        """The sentinel's raw answer: where the master of ``SERVICE`` is now."""
        return command(self.sentinel_port, "SENTINEL", "get-master-addr-by-name", SERVICE)

    def stop(self) -> None:
        for proc in (self.sentinel, self.master, self.replica):
            if proc is not None:
                reap(proc)
        self.sentinel = self.master = self.replica = None
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster(Processes):
    """``with RedisCluster() as c: c.url``; ``stop_node(i)`` / ``start_node(i)`` (same port,
    same ``nodes.conf``) and ``wait_ok()`` for an outage of one shard."""

    def __init__(self, nodes: int = 3) -> None:
        self.binary = _binary("redis-server")
        self.cli = _binary("redis-cli")
        ports = free_ports(2 * nodes)  # client ports, then the cluster bus ports
        self.ports, self.bus_ports = ports[:nodes], ports[nodes:]
        self.dir = Path(tempfile.mkdtemp(prefix="switchyard-cluster-"))
        self.procs: list[subprocess.Popen[Any] | None] = [None] * nodes

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def start_node(self, i: int) -> None:
        port = self.ports[i]
        argv = [self.binary, "--port", str(port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning",
                "--dir", str(self.dir), "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-port", str(self.bus_ports[i]),
                "--cluster-node-timeout", "1000"]  # fmt: skip
        self.procs[i] = _spawn(argv)
        _wait(port, b"+PONG", "PING")

    def stop_node(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            reap(proc)
            self.procs[i] = None

    def wait_ok(self) -> None:
        """Until every running node says ``cluster_state:ok`` (bounded)."""
        deadline = time.monotonic() + CLUSTER_OK_S
        while time.monotonic() < deadline:
            try:
                if all(
                    b"cluster_state:ok" in command(port, "CLUSTER", "INFO")
                    for port, proc in zip(self.ports, self.procs, strict=True)
                    if proc is not None
                ):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def keyslot(self, key: str) -> int:
        """``CLUSTER KEYSLOT key`` (asked of the first running node)."""
        port = next(p for p, proc in zip(self.ports, self.procs, strict=True) if proc)
        return int(command(port, "CLUSTER", "KEYSLOT", key)[1:].strip())

    def node_for_slot(self, slot: int) -> int:
        """Index of the node serving ``slot``, from ``CLUSTER NODES`` of a running node."""
        port = next(p for p, proc in zip(self.ports, self.procs, strict=True) if proc)
        raw = command(port, "CLUSTER", "NODES").partition(b"\r\n")[2].decode()
        for line in raw.splitlines():
            fields = line.split()
            if len(fields) < 9:
                continue
            node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for spec in fields[8:]:
                low, _, high = spec.partition("-")
                if not spec.startswith("[") and int(low) <= slot <= int(high or low):
                    return self.ports.index(node_port)
        raise RuntimeError(f"no node serves slot {slot}")

    def start(self) -> RedisCluster:
        for i in range(len(self.ports)):
            self.start_node(i)
        created = subprocess.run(  # noqa: S603
            [self.cli, "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=CLUSTER_OK_S, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        self.wait_ok()
        return self

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.stop_node(i)
        shutil.rmtree(self.dir, ignore_errors=True)
