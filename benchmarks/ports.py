"""Free loopback ports for tests and benchmarks that start servers (best effort, racy).

A leaf module (standard library only), so both ``benchmarks/`` and ``tests/`` can import it::

    port = free_port()
    base = free_port_block(4)  # base, base + 1, base + 2, base + 3 were all free
    engine, gateway = free_ports(2)
"""

from __future__ import annotations

import os
import socket

__all__ = ["free_port", "free_port_block", "free_ports"]

HOST = "127.0.0.1"
# Blocks come from below Linux's ephemeral range (32768-60999): there, client sockets of a busy
# run linger in TIME_WAIT and a block of kernel-picked neighbours is often refused.
BLOCK_RANGE = range(20000, 32768)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive free TCP ports on 127.0.0.1, from ``BLOCK_RANGE``.

    The scan starts at a per-process offset (parallel runs rarely probe the same ports) and
    raises ``OSError`` when the whole range has no such block.
    """
    if n < 1:
        raise ValueError("a block has at least one port")
    low, span = BLOCK_RANGE.start, len(BLOCK_RANGE)
    first = (os.getpid() * 37) % span
    for step in range(0, span, n + 7):
        base = low + (first + step) % span
        if base + n <= BLOCK_RANGE.stop and _all_free(base, n):
            return base
    raise OSError(f"no block of {n} free ports on {HOST}")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (a block from :func:`free_port_block`)."""
    base = free_port_block(n)
    return list(range(base, base + n))


def _all_free(base: int, n: int) -> bool:
    socks: list[socket.socket] = []
    try:
        for port in range(base, base + n):
            sock = socket.socket()
            socks.append(sock)
            sock.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()
