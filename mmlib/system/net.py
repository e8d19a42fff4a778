"""Ports on this machine: a free one for a new server, whether one is taken."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def connect_host(host: str) -> str:
    """Where to connect to reach a server bound to `host` (a wildcard bind answers on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
