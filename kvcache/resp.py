"""A minimal RESP2 client for the KV tier's data path: pipelined commands, few copies.

Why not redis-py here: its pure-Python reader copies every large reply about four times
(``recv`` 64 KiB chunks into a ``BytesIO``, read out, joined, stripped of ``\\r\\n``); on
2.9 MB KV blocks that capped a pipelined GET at 0.26-0.38 GiB/s on the machine where
``redis-benchmark`` reads 0.9-1.0 GiB/s (benchmarks/kvtier/throughput.py). Here a large bulk
reply is received with ``recv_into`` straight into a per-connection scratch buffer and handed
to the caller as a ``memoryview`` (valid during the callback only), and a large argument
(a block's payload) is sent without concatenating it to the command. Everything else (the
cluster, the async side, the gateway) stays on redis-py.

Scope: one Redis server over TCP (``redis://``, ``rediss://`` with TLS) or a Unix socket
(``unix://``); ``AUTH`` (user and password from the URL) and ``SELECT`` on connect; replies
``+``, ``-``, ``:``, ``$`` (no arrays: the tier sends GET, EXISTS and SET only). Bounded: at
most ``max_connections`` sockets (a caller waits at most ``timeout_s`` for one), every socket
operation times out after ``timeout_s``; a connection that saw any error is closed, never
reused. A pooled connection the server closed while it sat idle (a Redis restart, its
``timeout`` setting, ``CLIENT KILL``) is found on the next call and that call is sent once more
on a fresh connection (:meth:`RespClient.pipeline` says exactly when). Thread-safe (vLLM may
call from several threads).

Example::

    client = RespClient.from_url("redis://127.0.0.1:6379/0", timeout_s=1.0)
    client.pipeline([(b"SET", b"k", b"v"), (b"GET", b"k")], lambda i, r: bytes(r or b""))
"""

from __future__ import annotations

import queue
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Arg", "Command", "Reply", "RespClient", "RespError", "kernel_timeouts"]

T = TypeVar("T")
Arg = bytes | tuple[bytes, ...]
"""One argument; a tuple is sent as the concatenation of its parts (without copying them)."""
Command = Sequence[Arg]
Reply = memoryview | int | None
"""A bulk or simple string (memoryview, valid during the callback only), an integer, nil."""

_CHUNK = 65536
_SMALL = 16384  # arguments up to this size are joined into one send; larger ones go alone


_STALE = (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)
"""The peer closed the connection (EOF, ECONNRESET, EPIPE, a TLS close); a timeout is not one."""


class RespError(Exception):
    """An error reply (``-ERR ...``); the connection stays usable."""


class _Socket(Protocol):
    def sendall(self, data: bytes | memoryview, /) -> None: ...
    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int: ...
    def close(self) -> None: ...


def _encode(commands: Sequence[Command]) -> list[bytes]:
    """RESP arrays of bulk strings, as a list of parts (large arguments left uncopied)."""
    parts: list[bytes] = []
    small: list[bytes] = []
    for command in commands:
        small.append(b"*%d\r\n" % len(command))
        for arg in command:
            pieces = arg if isinstance(arg, tuple) else (arg,)
            small.append(b"$%d\r\n" % sum(len(p) for p in pieces))
            for piece in pieces:
                if len(piece) > _SMALL:
                    parts.append(b"".join(small))
                    small.clear()
                    parts.append(piece)
                else:
                    small.append(piece)
            small.append(b"\r\n")
    parts.append(b"".join(small))
    return [p for p in parts if p]


def kernel_timeouts(sock: socket.socket, timeout_s: float) -> socket.socket:
    """Make ``sock`` blocking with the timeout enforced by the kernel (``SO_RCVTIMEO`` and
    ``SO_SNDTIMEO``) instead of by Python.

    Why: a Python socket with a timeout polls before every ``recv``, so a 2 MiB KV block
    (tens of ``recv_into`` calls on loopback) costs as many extra ``poll`` calls and wakeups;
    without them a single-block GET went from 0.87x to 1.10x of ``redis-benchmark``'s
    bandwidth (median of 8 interleaved rounds, benchmarks/kvtier/throughput.py's method). An
    expired kernel timeout raises ``BlockingIOError``/``TimeoutError`` (both ``OSError``): the
    connection is closed like after any socket error. Where the option is missing (not Linux
    or BSD), Python's timeout stays.
    """
    whole = int(timeout_s)
    micros = int((timeout_s - whole) * 1e6)
    if whole == 0 and micros == 0:  # a zeroed timeval means "wait forever" to the kernel
        micros = 1
    timeval = struct.pack("@ll", whole, micros)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:
        return sock
    sock.settimeout(None)
    return sock


class _Conn:
    """One socket with its read buffer and a scratch buffer for large bulk replies."""

    def __init__(self, sock: _Socket) -> None:
        self.sock = sock
        self.buf = bytearray(_CHUNK)
        self.start = self.end = 0
        self.scratch = bytearray()
        self.received = 0  # bytes read from the socket, ever

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):  # compact: keep the unread tail
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start : self.end]
            self.start, self.end = 0, tail
        n = self.sock.recv_into(memoryview(self.buf)[self.end :])
        if n == 0:
            raise ConnectionError("Redis closed the connection")
        self.end += n
        self.received += n

    def _line(self) -> bytes:
        while True:
            at = self.buf.find(b"\r\n", self.start, self.end)
            if at >= 0:
                line = bytes(self.buf[self.start : at])
                self.start = at + 2
                return line
            self._fill()

    def _bulk(self, length: int) -> memoryview:
        need = length + 2
        have = self.end - self.start
        if need <= len(self.buf):  # small: served from the read buffer
            while self.end - self.start < need:
                self._fill()
            view = memoryview(self.buf)[self.start : self.start + length]
            self.start += need
            return view
        if len(self.scratch) < need:
            self.scratch = bytearray(need)
        target = memoryview(self.scratch)
        target[:have] = memoryview(self.buf)[self.start : self.end]
        self.start = self.end = 0
        got = have
        while got < need:
            n = self.sock.recv_into(target[got:need], need - got)
            if n == 0:
                raise ConnectionError("Redis closed the connection")
            got += n
            self.received += n
        return target[:length]

    def reply(self) -> Reply | RespError:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            length = int(rest)
            return None if length < 0 else self._bulk(length)
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return memoryview(rest)
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        raise ConnectionError(f"unexpected RESP reply type {kind!r}")


class RespClient:
    """A bounded pool of RESP2 connections to one server; see the module docstring.

    Example: ``RespClient.from_url("unix:///run/redis.sock?db=0", max_connections=4)``.
    """

    def __init__(
        self,
        connect: Callable[[], _Socket],
        *,
        handshake: Sequence[Command] = (),
        max_connections: int = 8,
        timeout_s: float = 1.0,
    ) -> None:
        if max_connections < 1:  # a pool that never lends a connection: every call would fail
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self._connect = connect
        self._handshake = list(handshake)
        self._timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._idle: queue.LifoQueue[_Conn] = queue.LifoQueue(max_connections)
        self._closed = False
        self._lock = threading.Lock()  # orders close() against connections being returned

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 8, timeout_s: float = 1.0) -> RespClient:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.scheme == "unix":
            db = int(query.get("db", ["0"])[0])
        elif parts.scheme in ("redis", "rediss"):
            db = int(parts.path.strip("/") or 0)
        else:
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        handshake: list[Command] = []
        if parts.password is not None:
            user = unquote(parts.username or "default").encode()
            handshake.append((b"AUTH", user, unquote(parts.password).encode()))
        if db:
            handshake.append((b"SELECT", str(db).encode()))

        def connect() -> _Socket:
            if parts.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout_s)
                sock.connect(parts.path)
                return kernel_timeouts(sock, timeout_s)
            host, port = parts.hostname or "127.0.0.1", parts.port or 6379
            tcp = socket.create_connection((host, port), timeout=timeout_s)
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if parts.scheme == "rediss":  # TLS keeps Python's timeouts (the SSL layer needs them)
                return ssl.create_default_context().wrap_socket(tcp, server_hostname=host)
            return kernel_timeouts(tcp, timeout_s)

        return cls(
            connect, handshake=handshake, max_connections=max_connections, timeout_s=timeout_s
        )

    def _acquire(self) -> tuple[_Conn, bool]:
        """A connection and whether it came from the idle pool (it may have gone stale)."""
        if not self._slots.acquire(timeout=self._timeout_s):
            raise TimeoutError("no Redis connection free within the timeout")
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            pass
        try:
            return self._open(), False
        except BaseException:
            self._slots.release()
            raise

    def _open(self) -> _Conn:
        """A new connection, handshake done (the caller holds its slot)."""
        conn = _Conn(self._connect())
        try:
            if self._handshake:
                self._run(conn, self._handshake, lambda _i, _r: None)
            return conn
        except BaseException:
            conn.sock.close()
            raise

    def _run(
        self, conn: _Conn, commands: Sequence[Command], handle: Callable[[int, Reply], T]
    ) -> list[T]:
        for part in _encode(commands):
            conn.sock.sendall(part)
        out: list[T] = []
        error: RespError | None = None
        for i in range(len(commands)):
            reply = conn.reply()
            if isinstance(reply, RespError):
                error = error or reply
                reply = None
            out.append(handle(i, reply))
        if error is not None:
            raise error
        return out

    def pipeline(self, commands: Sequence[Command], handle: Callable[[int, Reply], T]) -> list[T]:
        """Send every command, then read every reply in order through ``handle(i, reply)``.

        One round trip. An error reply raises :class:`RespError` after all replies were read
        (the connection stays in step); a socket error or timeout raises ``OSError`` and
        closes the connection.

        A connection taken from the idle pool may have been closed by the server meanwhile
        (a restart, its idle ``timeout``, ``CLIENT KILL``): when sending fails or the reply
        fails with a connection error (EOF, ``ECONNRESET``, ``EPIPE``) *before any byte of a
        reply was read*, the commands are sent once more on a new connection. Only then:
        never after part of a reply was read (``handle`` may have seen it), never after a
        timeout (the server may just be slow), never on a connection opened for this call, and
        at most once. Sending the commands twice is safe because the ones the tier sends are
        idempotent: ``GET``, ``EXISTS``, ``DEL``, ``EVALSHA`` of a read-only script, and
        ``SET NX`` (a repeat of one that was executed finds the key and writes nothing).
        Without the retry every stale idle socket (up to ``max_connections``) would fail a
        call in turn, and each failure opens the store's breaker for ``retry_s``.
        """
        conn, pooled = self._acquire()
        received = conn.received
        ok = False
        try:
            try:
                out = self._run(conn, commands, handle)
            except _STALE:
                if not pooled or conn.received != received:  # a reply had begun: not stale
                    raise
                conn.sock.close()
                conn = self._open()  # the slot stays ours; if this fails, the call fails
                out = self._run(conn, commands, handle)
            ok = True
            return out
        except RespError:
            ok = True
            raise
        finally:
            with self._lock:
                keep = ok and not self._closed
                if keep:
                    self._idle.put_nowait(conn)
            if not keep:
                conn.sock.close()
            self._slots.release()

    def close(self) -> None:
        """Close the idle connections; a connection in use closes when it is returned (and so
        does any opened by a later call: nothing is kept once closed)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                self._idle.get_nowait().sock.close()
            except queue.Empty:
                return
