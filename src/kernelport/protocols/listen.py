"""Listening sockets and uvicorn servers, shared by the server, the gateway and the
``--frontends`` supervisor."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn


class QuietUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: its owner decides when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port), not yet listening, so a busy
    port is a clear error naming it. ``reuse_port``: shared with other processes that set it
    too (``--frontends``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock
