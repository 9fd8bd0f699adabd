"""Free loopback ports for tests and benchmarks that start servers (best effort, racy).

A leaf module (standard library only), so both ``benchmarks/`` and ``tests/`` can import it::

    port = free_port()
    base = free_port_block(4)  # base, base + 1, base + 2, base + 3 were all free
"""

from __future__ import annotations

import socket

__all__ = ["free_port", "free_port_block"]

HOST = "127.0.0.1"
ATTEMPTS = 50


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive free TCP ports on 127.0.0.1 (bounded retries).

    Raises ``OSError`` when no such block turns up in ``ATTEMPTS`` tries.
    """
    if n < 1:
        raise ValueError("a block has at least one port")
    for _ in range(ATTEMPTS):
        base = free_port()
        if base + n > 65536:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise OSError(f"no block of {n} free ports on {HOST}")
