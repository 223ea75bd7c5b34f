"""V2 inference requests served straight from the HTTP parser, without the ASGI cycle.

uvicorn serves every request through an ASGI cycle: a scope, a task started when the headers
are parsed, ``receive()`` messages that copy the body twice (into a bytearray, then out of
it), ``send()`` messages whose headers are checked against regexes, and a second socket
write for the body. For ``POST /v2/models/{m}[/versions/{v}]/infer`` that was a third of
the front end's cost per request. ``DirectProtocol`` keeps uvicorn for everything else and
for every request it does not recognise as a plain inference. The parser's callbacks go to
an ``Http1Reader`` (``http1.py``, compiled), which replays every other request to uvicorn;
a plain one is collected there, run by ``RestInference.response`` (the same code, the same
answers as the ASGI path) once its body is complete, and answered with one write.

A plain inference: HTTP/1.1 POST to the infer route (no percent-escapes, the route table's
shapes otherwise), a Content-Length within ``--max-request-bytes``, no Content-Encoding or
Transfer-Encoding, no ``Expect: 100-continue``, no request still being answered on the
connection (pipelined requests queue in uvicorn as before) and a bare ``RestApp`` (an API-key
server wraps it, and takes the ASGI path). Everything else reaches the app over ASGI
unchanged.

Because the route is known once the headers are parsed, the request is announced to its
model's queue from then (``DataPlane.announce``): a batch cut can wait for the requests whose
bodies the loop is still reading. The announcement is released when the request is queued,
fails, or its connection is lost first.
"""

from __future__ import annotations

import asyncio

from kernelport.protocols.http_timeouts import HeaderTimeoutProtocol
from kernelport.protocols.rest.app import RestApp
from kernelport.protocols.rest.http1 import Http1Reader, Inference


class DirectProtocol(HeaderTimeoutProtocol):
    """KernelPort's uvicorn protocol, serving plain inference requests itself."""

    _reader: Http1Reader | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        app = self.app
        plain = isinstance(app, RestApp) and self.limit_concurrency is None
        # the parser calls the reader, which hands uvicorn every request not plain (all of
        # them for an app that is not a bare RestApp: an API-key server wraps it)
        self._reader = Http1Reader(self, app.inference if plain else None)
        self.parser = self._reader.parser

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        reader = self._reader
        if reader is not None and reader.in_head and not self._header_deadline:
            # uvicorn's on_message_begin would have set it; the reader calls it only once
            # the headers are complete
            self._header_deadline = self.loop.time() + self.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        cycle: object = self.cycle
        super().connection_lost(exc)
        if type(cycle) is Inference and cycle.announced is not None:
            cycle.announced.release()  # idempotent: its task (if it started) releases too


def direct_protocol(header_timeout: float) -> type[DirectProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    return type("DirectProtocol", (DirectProtocol,), {"header_timeout": header_timeout})
