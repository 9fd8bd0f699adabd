"""The minimal RESP2 client against a real redis-server."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvcache.blockstore import RedisBlockStore
from kvcache.resp import Reply, RespClient, RespError, kernel_timeouts
from kvcache.tier import TierNamespace
from tests.processes import die_with_parent, reap
from tests.redis_server import RedisServer


def _bytes(_i: int, reply: Reply) -> bytes | int | None:
    return bytes(reply) if isinstance(reply, memoryview) else reply


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[RespClient]:
    c = RespClient.from_url(redis_server.url, max_connections=2, timeout_s=2.0)
    yield c
    c.close()


def test_pipeline_replies_in_order(client: RespClient) -> None:
    replies = client.pipeline(
        [
            (b"SET", b"a", b"1"),
            (b"SET", b"a", b"2", b"NX"),
            (b"GET", b"a"),
            (b"GET", b"missing"),
            (b"EXISTS", b"a"),
            (b"SET", b"big", (b"head", b"x" * 100_000, b"tail")),
            (b"STRLEN", b"big"),
        ],
        _bytes,
    )
    assert replies == [b"OK", None, b"1", None, 1, b"OK", 100_008]


@pytest.mark.parametrize(
    "sizes",
    [
        [10] * 50,
        [40_000] * 5,  # several replies straddle the 64 KiB read buffer: it compacts
        [65_534, 65_535, 65_536, 1],  # around the buffer size
        [3_000_000, 5, 3_000_000],  # large replies go to the scratch buffer
        [1_000_000, 10, 2_000_000, 10],  # the scratch buffer grows
    ],
)
def test_values_of_every_size(client: RespClient, sizes: list[int]) -> None:
    values = [os.urandom(n) for n in sizes]
    client.pipeline([(b"SET", b"k%d" % i, v) for i, v in enumerate(values)], _bytes)
    got = client.pipeline([(b"GET", b"k%d" % i) for i in range(len(values))], _bytes)
    assert got == values


def test_error_reply_keeps_the_connection(client: RespClient) -> None:
    client.pipeline([(b"SET", b"s", b"text")], _bytes)
    with pytest.raises(RespError, match="not an integer"):
        client.pipeline([(b"INCR", b"s"), (b"GET", b"s")], _bytes)
    assert client.pipeline([(b"GET", b"s")], _bytes) == [b"text"]  # still in step


def test_array_reply_is_refused(client: RespClient, redis_server: RedisServer) -> None:
    with pytest.raises(ConnectionError, match="unexpected RESP reply"):
        client.pipeline([(b"KEYS", b"*")], _bytes)
    assert client.pipeline([(b"PING",)], _bytes) == [b"PONG"]  # a fresh connection


def test_auth_and_select(redis_server: RedisServer) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    raw.config_set("requirepass", "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/3"
    c = RespClient.from_url(url, timeout_s=2.0)
    c.pipeline([(b"SET", b"where", b"db3")], _bytes)
    authed = redis.Redis(port=redis_server.port, password="s3cret", db=3)
    assert authed.get("where") == b"db3"
    user = RespClient.from_url(f"redis://default:s3cret@127.0.0.1:{redis_server.port}/0")
    assert user.pipeline([(b"PING",)], _bytes) == [b"PONG"]
    wrong = RespClient.from_url(f"redis://:nope@127.0.0.1:{redis_server.port}/0", max_connections=1)
    for _ in range(2):  # the slot is released after a failed handshake
        with pytest.raises(RespError, match="WRONGPASS|invalid"):
            wrong.pipeline([(b"PING",)], _bytes)
    for c_ in (c, user, wrong):
        c_.close()
    authed.close()
    raw.close()


def test_pool_is_bounded(redis_server: RedisServer) -> None:
    c = RespClient.from_url(redis_server.url, max_connections=1, timeout_s=0.2)

    def reenter(_i: int, _reply: Reply) -> object:
        return c.pipeline([(b"PING",)], _bytes)  # the only connection is in use

    with pytest.raises(TimeoutError, match="no Redis connection"):
        c.pipeline([(b"PING",)], reenter)
    assert c.pipeline([(b"PING",)], _bytes) == [b"PONG"]  # released after the failure
    c.close()


def test_server_gone(redis_server: RedisServer) -> None:
    c = RespClient.from_url(redis_server.url, timeout_s=1.0)
    assert c.pipeline([(b"PING",)], _bytes) == [b"PONG"]
    redis_server.stop()
    with pytest.raises(OSError):
        c.pipeline([(b"PING",)], _bytes)  # the idle connection was cut
    with pytest.raises(OSError):
        c.pipeline([(b"PING",)], _bytes)  # refused
    redis_server.start()
    assert c.pipeline([(b"PING",)], _bytes) == [b"PONG"]
    c.close()


def test_a_connection_in_use_closes_when_returned_after_close(redis_server: RedisServer) -> None:
    """close() while a pipeline runs: that connection is closed when returned, not pooled
    where nobody would close it; a later call still works and keeps nothing open."""
    socks: list[socket.socket] = []

    def connect() -> socket.socket:
        socks.append(socket.create_connection(("127.0.0.1", redis_server.port), timeout=2.0))
        return socks[-1]

    c = RespClient(connect, timeout_s=2.0)

    def close_meanwhile(i: int, reply: Reply) -> bytes | int | None:
        c.close()  # the only connection is in use
        return _bytes(i, reply)

    assert c.pipeline([(b"PING",)], close_meanwhile) == [b"PONG"]
    assert [s.fileno() for s in socks] == [-1]
    assert c.pipeline([(b"PING",)], _bytes) == [b"PONG"]
    assert [s.fileno() for s in socks] == [-1, -1]


class HalfReply:
    """A socket answering ``$10\\r\\nabc`` and then closing: a reply cut short."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def sendall(self, data: bytes | memoryview, /) -> None:
        return None

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        n = min(len(self.data), len(buffer))
        buffer[:n] = self.data[:n]
        self.data = self.data[n:]
        return n

    def close(self) -> None:
        return None


@pytest.mark.parametrize(
    "data",
    [b"", b"$10\r\nabc", b"$100000\r\n" + b"x" * 70_000, b"+OK"],
    ids=["empty", "short bulk", "short large bulk", "no line end"],
)
def test_cut_replies_raise(data: bytes) -> None:
    c = RespClient(lambda: HalfReply(data))
    with pytest.raises(ConnectionError, match="closed"):
        c.pipeline([(b"GET", b"k")], _bytes)


def test_bad_scheme() -> None:
    with pytest.raises(ValueError, match="scheme"):
        RespClient.from_url("http://127.0.0.1:1")


def test_tls_against_a_plain_server(redis_server: RedisServer) -> None:
    c = RespClient.from_url(f"rediss://127.0.0.1:{redis_server.port}/0", timeout_s=1.0)
    with pytest.raises((ssl.SSLError, OSError)):
        c.pipeline([(b"PING",)], _bytes)


def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen(  # noqa: S603
        [binary, "--port", "0", "--unixsocket", str(path), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        c = RespClient.from_url(f"unix://{path}?db=2", timeout_s=2.0)
        c.pipeline([(b"SET", b"u", b"nix")], _bytes)
        assert c.pipeline([(b"GET", b"u")], _bytes) == [b"nix"]
        other = RespClient.from_url(f"unix://{path}", timeout_s=2.0)
        assert other.pipeline([(b"GET", b"u")], _bytes) == [None]  # db 0
        c.close()
        other.close()
    finally:
        reap(proc)


class Silent:
    """A loopback server that accepts, optionally sends ``greeting``, then never answers."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.greeting = greeting
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10.0)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.accepted.append(conn)
        conn.recv(65536)
        conn.sendall(self.greeting)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=15.0)
        for conn in self.accepted:
            conn.close()


@pytest.mark.parametrize(
    "greeting", [b"", b"$3000000\r\n" + b"x" * 100_000], ids=["no reply", "stalled large bulk"]
)
def test_a_silent_server_times_out(greeting: bytes) -> None:
    """The kernel's receive timeout ends a read the server never completes: OSError, the
    connection closed, the pool slot free again."""
    server = Silent(greeting)
    try:
        c = RespClient.from_url(f"redis://127.0.0.1:{server.port}/0", max_connections=1,
                                timeout_s=0.2)  # fmt: skip
        with pytest.raises(OSError):
            c.pipeline([(b"GET", b"k")], _bytes)
        with pytest.raises(OSError):  # the slot was released: a new connection is tried
            c.pipeline([(b"GET", b"k")], _bytes)
    finally:
        server.close()


@pytest.mark.parametrize("timeout_s", [1.5, 0.25, 0.0])
def test_kernel_timeouts(timeout_s: float) -> None:
    """Blocking socket, both kernel timeouts set; the kernel rounds them up to its tick (at
    most 10 ms at HZ=100) and a zero request still sets a (tiny) timeout, never "forever"."""
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(3.0)
        assert kernel_timeouts(a, timeout_s) is a
        assert a.gettimeout() is None  # blocking: no poll before each recv
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            seconds, micros = struct.unpack("@ll", a.getsockopt(socket.SOL_SOCKET, option, 16))
            got = seconds + micros / 1e6
            assert got > 0
            assert timeout_s <= got + 1e-6 <= timeout_s + 0.0101


def test_kernel_timeouts_unsupported_keeps_python_timeout() -> None:
    sock = socket.socket()
    sock.settimeout(2.0)
    sock.close()  # setsockopt fails (EBADF), as on a platform without the options
    assert kernel_timeouts(sock, 1.0) is sock and sock.gettimeout() == 2.0


def _pooled(c: RespClient, n: int) -> None:
    """Leave ``n`` connections in ``c``'s idle pool (``n`` pipelines held open together)."""
    barrier = threading.Barrier(n, timeout=5.0)

    def hold(_i: int, reply: Reply) -> bytes | int | None:
        barrier.wait()
        return _bytes(_i, reply)

    threads = [threading.Thread(target=c.pipeline, args=([(b"PING",)], hold)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10.0)


def test_idle_connections_killed_by_the_server_are_replaced(
    redis_server: RedisServer,
) -> None:
    """A Redis restart or its idle ``timeout`` closes pooled sockets (here ``CLIENT KILL``):
    each call that meets one sends again on a new connection; no call fails, the breaker
    stays closed."""
    c = RespClient.from_url(redis_server.url, max_connections=4, timeout_s=2.0)
    _pooled(c, 4)
    admin = redis.Redis.from_url(redis_server.url)
    assert len(admin.client_list(_type="normal")) == 5  # the pool's 4 and admin
    assert admin.execute_command("CLIENT", "KILL", "TYPE", "normal") == 4  # not admin itself
    store = RedisBlockStore(c)
    ns = TierNamespace(model="m", block_size=16, layout="test")
    hashes = [bytes([i]) * 32 for i in range(4)]
    assert store.put_many(ns, [(h, b"v" * 100) for h in hashes], ttl_s=60) == 4
    assert store.lookup(ns, hashes) == 4
    assert store.get_many(ns, hashes) == [b"v" * 100] * 4
    assert store.read_many(ns, hashes, lambda i, v: None) == [True] * 4
    assert store.stats().errors == 0 and store.stats().skipped == 0
    _pooled(c, 4)  # every pooled connection is live again
    assert c.pipeline([(b"PING",)], _bytes) == [b"PONG"]
    admin.close()
    c.close()


class Scripted:
    """A fake socket: each ``sendall`` makes the next scripted reply readable; ``None``
    scripts a timeout. After a reply's bytes: EOF."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = replies
        self.data: bytes | None = b""

    def sendall(self, data: bytes | memoryview, /) -> None:
        self.data = self.replies.pop(0)

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        if self.data is None:
            raise TimeoutError("timed out")
        n = min(len(self.data), len(buffer))
        buffer[:n] = self.data[:n]
        self.data = self.data[n:]
        return n

    def close(self) -> None:
        return None


@pytest.mark.parametrize(
    ("second", "retried"),
    [
        (b"", True),  # EOF before any reply byte: stale, sent again on a new connection
        (b"+OK\r\n$10\r\nabc", False),  # EOF inside a reply: handle saw part of it
        (None, False),  # a timeout: the server may be slow, never sent twice
    ],
    ids=["eof", "partial reply", "timeout"],
)
def test_only_a_stale_pooled_connection_is_retried(second: bytes | None, retried: bool) -> None:
    sockets = [Scripted([b"+OK\r\n", second]), Scripted([b"+OK\r\n+OK\r\n"])]
    connects: list[Scripted] = []

    def connect() -> Scripted:
        connects.append(sockets[len(connects)])
        return connects[-1]

    c = RespClient(connect, max_connections=1, timeout_s=1.0)
    assert c.pipeline([(b"SET", b"k", b"v")], _bytes) == [b"OK"]  # pooled now
    if retried:
        assert c.pipeline([(b"SET", b"k", b"v"), (b"GET", b"k")], _bytes) == [b"OK", b"OK"]
    else:
        with pytest.raises(OSError):
            c.pipeline([(b"SET", b"k", b"v"), (b"GET", b"k")], _bytes)
    assert len(connects) == (2 if retried else 1)


def test_a_new_connection_is_not_retried() -> None:
    connects: list[Scripted] = []

    def connect() -> Scripted:
        connects.append(Scripted([b""]))
        return connects[-1]

    with pytest.raises(ConnectionError, match="closed"):
        RespClient(connect).pipeline([(b"GET", b"k")], _bytes)
    assert len(connects) == 1


def test_a_pool_of_no_connections_is_refused() -> None:
    with pytest.raises(ValueError, match="max_connections must be at least 1"):
        RespClient.from_url("redis://127.0.0.1:1/0", max_connections=0)
