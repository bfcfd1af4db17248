"""Loopback ports for the servers that tests and benches start: below the kernel's ephemeral range.

A port from ``bind(("127.0.0.1", 0))`` lies in the ephemeral range
(``net.ipv4.ip_local_port_range``, 32768-60999 by default), the range the
kernel also takes the local port of every outgoing connection from.  Between
choosing such a port and a server binding it (a Galera node that starts after
two others have synced, a private server started again after a crash), any
client connection may take it, and the server fails with "Address already in
use" (seen in CI: a Galera node's port taken while the cluster started).
Below that range a port is only ever taken by a bind that names it.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path

#: The lowest port handed out; the range up to the ephemeral one is several thousand ports wide.
LOWEST = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind ``port`` now (with SO_REUSEADDR, as servers do: TIME_WAIT is no obstacle)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server accepts connections on ``port`` now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unused_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A free port below the ephemeral range, chosen at random (two test processes rarely pick the same)."""
    below = ephemeral_start()
    lowest = LOWEST if below > LOWEST + 1000 else 1024
    for _ in range(1000):
        port = random.randrange(lowest, below)
        if port not in avoid and port_free(port, host):
            return port
    raise RuntimeError(f"no free port on {host} between {lowest} and {below - 1}")
