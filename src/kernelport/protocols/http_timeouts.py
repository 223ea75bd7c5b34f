"""uvicorn's httptools protocol with a deadline for request headers (slow-header clients), and
a callback when the connection drops, so a request can notice its client leaving for free.

uvicorn closes idle keep-alive connections but lets a connection that sent part of a request
line or headers and then stalled hold its socket forever; many such connections exhaust file
descriptors. A deadline is set when the connection opens and when each request begins, and is
cleared once that request's headers are complete.

Neither deadline is a timer per request: uvicorn armed one for the keep-alive timeout after
every response and cancelled it on the next request's bytes, and a header timer per request
would be a second (two timers made and cancelled per request were ~3% of the HTTP front
end's core under load). Each connection keeps the two deadlines as numbers, and one sweep per
event loop, running while it has connections, closes those past either deadline. A
connection is therefore closed no sooner than its deadline and at most one sweep period
(``SWEEP_S``, or a quarter of a timeout shorter than 4 s) later.

A request's head has a size limit too (``MAX_HEAD_BYTES`` of URL and header names and
values): httptools sets none, so a client could send headers until memory ran out. A head
over it is answered 431 and the connection closed.

The only other way for an ASGI app to learn that its client left is to keep a ``receive()``
pending, i.e. a task per request: it cost the REST path ~13 µs of the core per request and
~36 µs of p50 on a small model. Each request's scope carries ``DISCONNECT_EXTENSION`` instead:
a callable that registers (or, given None, clears) one function to call when the connection
is lost.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DISCONNECT_EXTENSION = "kernelport.disconnect"
"""Scope extension: ``watch(hang_up)`` calls ``hang_up()`` once if the connection is lost
(on the next loop turn if it already was); ``watch(None)`` stops watching."""

HangUp = Callable[[], None]


SWEEP_S = 1.0  # the longest gap between two sweeps

MAX_HEAD_BYTES = 64 * 1024
"""The most bytes of URL, header names and header values one request's head may carry."""


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop a head over ``MAX_HEAD_BYTES``."""


class _Sweep:
    """The connections of one event loop with deadlines, and the timer that checks them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connections: set[HeaderTimeoutProtocol] = set()
        self.period = SWEEP_S
        self._timer: asyncio.TimerHandle | None = None

    def add(self, connection: HeaderTimeoutProtocol, shortest_timeout: float) -> None:
        self.connections.add(connection)
        self.period = min(self.period, max(shortest_timeout / 4, 0.01))
        if self._timer is None:
            self._timer = self.loop.call_later(self.period, self._run)

    def _run(self) -> None:
        self._timer = None
        now = self.loop.time()
        for connection in list(self.connections):
            connection._check(now)
        if self.connections:
            self._timer = self.loop.call_later(self.period, self._run)


_sweeps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweep] = weakref.WeakKeyDictionary()


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """Closes a connection whose request headers are not complete within ``header_timeout``,
    or that stays idle between requests longer than uvicorn's keep-alive timeout."""

    header_timeout: float = 10.0
    _header_deadline = 0.0  # 0: none (headers complete)
    _idle_deadline = 0.0  # 0: none (a request is being read or answered)
    _sweep: _Sweep | None = None
    _hang_up: HangUp | None = None
    _lost = False
    _head_bytes = 0
    head_too_large = False  # set once a head passed MAX_HEAD_BYTES: the parser's error is 431

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sweep = _sweeps.get(self.loop)
        if sweep is None:
            sweep = _sweeps[self.loop] = _Sweep(self.loop)
        self._sweep = sweep
        sweep.add(self, min(self.header_timeout, self.timeout_keep_alive))
        self._header_deadline = self.loop.time() + self.header_timeout

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        # Requests on one connection run one at a time (pipelined ones wait for the previous
        # response), so one slot per connection serves every request it carries.
        extensions = cast("dict[str, Any]", self.scope.setdefault("extensions", {}))
        extensions[DISCONNECT_EXTENSION] = self._watch
        if not self._header_deadline:  # a keep-alive connection's next request
            self._header_deadline = self.loop.time() + self.header_timeout

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self.head_too_large = True
            raise HeadTooLarge  # httptools stops; uvicorn calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if not self.head_too_large:
            super().send_400_response(msg)
            return
        body = f"request head is larger than the limit of {MAX_HEAD_BYTES} bytes".encode()
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        head += (b"content-type: text/plain; charset=utf-8\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n")  # fmt: skip
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._header_deadline = 0.0
        super().on_headers_complete()

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn arms its own timer only in on_response_complete, which this replaces
        self._idle_deadline = 0.0

    def on_response_complete(self) -> None:
        # uvicorn's, with the keep-alive deadline in place of its timer
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_deadline = self.loop.time() + self.timeout_keep_alive

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_deadline = self._idle_deadline = 0.0
        if self._sweep is not None:
            self._sweep.connections.discard(self)
        self._lost = True
        super().connection_lost(exc)
        hang_up, self._hang_up = self._hang_up, None
        if hang_up is not None:
            hang_up()

    def _check(self, now: float) -> None:
        if self._header_deadline and now >= self._header_deadline:
            self._header_deadline = 0.0
            if not self.transport.is_closing():
                self.transport.close()
        elif self._idle_deadline and now >= self._idle_deadline:
            self._idle_deadline = 0.0
            self.timeout_keep_alive_handler()

    def _watch(self, hang_up: HangUp | None) -> None:
        if hang_up is not None and self._lost:
            self.loop.call_soon(hang_up)  # as a pending receive() would: on the next turn
            return
        self._hang_up = hang_up


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)`` for a given timeout."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})
