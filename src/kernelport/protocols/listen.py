"""Listening sockets and uvicorn servers, shared by the server, the gateway and the
``--frontends`` supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

#: how often an idle server wakes: the Date header's resolution is a second anyway
TICK_S = 1.0


class QuietUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling (its owner decides when it stops) and without
    its ten wake-ups a second.

    uvicorn's main loop sleeps 0.1 s between checks of ``should_exit``; with an HTTP and a
    metrics server that is 20 wake-ups a second of an idle process (about half a percent of
    a core here, and a core a compute-bound model could use). Here the loop ticks once a
    second (to refresh the Date header) and setting ``should_exit`` wakes it at once."""

    _exit_event: asyncio.Event | None = None

    @property
    def should_exit(self) -> bool:
        return bool(self.__dict__.get("_should_exit", False))

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self.__dict__["_should_exit"] = value
        if value and self._exit_event is not None:
            self._exit_event.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        self._exit_event = event = asyncio.Event()
        # on_tick(0): a tick whose count refreshes the Date header (uvicorn: every 10th)
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), TICK_S)


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
