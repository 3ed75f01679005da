"""Loopback ports: a free one for a server we start, and a clear error for a busy one.

A server that cannot bind its port fails deep inside vLLM or ``http.server``
with a traceback; checking first turns that into one line that names the port
and the fix. The check is advisory (another process can take the port between
the check and the bind), which is why the servers' own bind errors are still
reported, but it catches the common case: a server from an earlier run still up.
"""

from __future__ import annotations

import socket

from ecoquant.errors import EcoquantError


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it), for a server started right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails now (someone listens there, or the address is not ours)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def require_free_port(host: str, port: int) -> None:
    """Raise one clear line if ``host:port`` cannot be bound."""
    if port_in_use(host, port):
        raise EcoquantError(
            f"port {port} on {host} is in use (another server is listening there); stop it or choose another --port"
        )
