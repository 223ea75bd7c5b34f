"""uvicorn's httptools protocol with a deadline for request headers (slow-header clients), and
a callback when the connection drops, so a request can notice its client leaving for free.

uvicorn closes idle keep-alive connections but lets a connection that sent part of a request
line or headers and then stalled hold its socket forever; many such connections exhaust file
descriptors. A timer starts when the connection opens and when each request begins, and is
cancelled once that request's headers are complete.

The only other way for an ASGI app to learn that its client left is to keep a ``receive()``
pending, i.e. a task per request: it cost the REST path ~13 µs of the core per request and
~36 µs of p50 on a small model. Each request's scope carries ``DISCONNECT_EXTENSION`` instead:
a callable that registers (or, given None, clears) one function to call when the connection
is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DISCONNECT_EXTENSION = "kernelport.disconnect"
"""Scope extension: ``watch(hang_up)`` calls ``hang_up()`` once if the connection is lost
(on the next loop turn if it already was); ``watch(None)`` stops watching."""

HangUp = Callable[[], None]


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """Closes a connection whose request headers are not complete within ``header_timeout``."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _hang_up: HangUp | None = None
    _lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # Requests on one connection run one at a time (pipelined ones wait for the previous
        # response), so one slot per connection serves every request it carries.
        extensions = cast("dict[str, Any]", self.scope.setdefault("extensions", {}))
        extensions[DISCONNECT_EXTENSION] = self._watch
        if self._header_timer is None:  # a keep-alive connection's next request
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._lost = True
        super().connection_lost(exc)
        hang_up, self._hang_up = self._hang_up, None
        if hang_up is not None:
            hang_up()

    def _watch(self, hang_up: HangUp | None) -> None:
        if hang_up is not None and self._lost:
            self.loop.call_soon(hang_up)  # as a pending receive() would: on the next turn
            return
        self._hang_up = hang_up

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)`` for a given timeout."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})
