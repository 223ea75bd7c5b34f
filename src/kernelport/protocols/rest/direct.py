"""V2 inference requests served straight from the HTTP parser, without the ASGI cycle.

uvicorn serves every request through an ASGI cycle: a scope, a task started when the headers
are parsed, ``receive()`` messages that copy the body twice (into a bytearray, then out of
it), ``send()`` messages whose headers are checked against regexes, and a second socket
write for the body. For ``POST /v2/models/{m}[/versions/{v}]/infer`` that was a third of
the front end's cost per request. ``DirectProtocol`` keeps uvicorn for everything else and
for every request it does not recognise as a plain inference; a plain one is collected from
the parser's callbacks, run by ``RestInference.response`` (the same code, the same answers
as the ASGI path) once its body is complete, and answered with one write.

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
import logging
from http import HTTPStatus

import httptools

from kernelport.core.fill import Announcement
from kernelport.protocols.http_timeouts import HeaderTimeoutProtocol
from kernelport.protocols.rest.app import RestApp
from kernelport.protocols.rest.inference import RestInference, error_response, plain_request

log = logging.getLogger("kernelport.http")

_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CLOSE = b"connection: close\r\n"


class _Settled:
    """Stands in for the ASGI cycle's event: uvicorn sets it when the connection is lost."""

    __slots__ = ()

    def set(self) -> None:
        pass


_SETTLED = _Settled()


class Inference:
    """One plain inference request, in the place uvicorn keeps its current cycle
    (``protocol.cycle``), so pipelining, shutdown and connection loss see it as one."""

    __slots__ = ("announced", "chunks", "disconnected", "headers", "keep_alive",
                 "response_complete", "target")  # fmt: skip
    message_event = _SETTLED

    def __init__(
        self,
        target: tuple[str, str],
        headers: dict[bytes, bytes],
        keep_alive: bool,
        announced: Announcement | None,
    ) -> None:
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.announced = announced
        self.chunks: list[bytes] = []
        self.disconnected = False
        self.response_complete = False


class DirectProtocol(HeaderTimeoutProtocol):
    """KernelPort's uvicorn protocol, serving plain inference requests itself."""

    _rest: RestInference | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        app = self.app
        plain = isinstance(app, RestApp) and self.limit_concurrency is None
        self._rest = app.inference if plain else None

    def on_headers_complete(self) -> None:
        inference = self._plain_inference() if self._rest is not None else None
        if inference is None:
            super().on_headers_complete()
            return
        self._header_deadline = 0.0
        self.cycle = inference  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        cycle: object = self.cycle
        if type(cycle) is Inference:
            cycle.chunks.append(body)  # at most the Content-Length, checked against the limit
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        cycle: object = self.cycle
        if type(cycle) is not Inference:
            super().on_message_complete()
            return
        task = self.loop.create_task(self._answer(cycle))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def connection_lost(self, exc: Exception | None) -> None:
        cycle: object = self.cycle
        super().connection_lost(exc)
        if type(cycle) is Inference and cycle.announced is not None:
            cycle.announced.release()  # idempotent: its task (if it started) releases too

    def _plain_inference(self) -> Inference | None:
        parser = self.parser
        if (
            parser.get_method() != b"POST"
            or self.expect_100_continue
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
        ):
            return None
        if self.cycle is not None and not self.cycle.response_complete:
            return None  # pipelined behind a request still being answered: uvicorn queues it
        rest = self._rest
        assert rest is not None
        path = httptools.parse_url(self.url).path
        plain = plain_request(path, self.headers, rest.max_request_bytes)
        if plain is None:
            return None
        target, headers = plain
        keep_alive = bool(parser.should_keep_alive())
        return Inference(target, headers, keep_alive, rest.announce(*target))

    async def _answer(self, cycle: Inference) -> None:
        rest = self._rest
        assert rest is not None
        chunks = cycle.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        cycle.chunks = []
        model, version = cycle.target
        try:
            response = await rest.response(
                model, version, cycle.headers, body, cycle.announced, self._watch
            )
        except Exception:
            log.exception("unhandled error on POST /v2/models/%s/infer", model)
            response = error_response(500, "internal server error")
        if cycle.disconnected:
            return
        if self.flow.write_paused:
            await self.flow.drain()
            if cycle.disconnected:
                return
        head = [_STATUS[response.status]]
        for name, value in self.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        for name, value in response.headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"content-length: %d\r\n" % len(response.body))
        if not cycle.keep_alive:
            head.append(_CLOSE)
        head.append(b"\r\n")
        self.transport.writelines([b"".join(head), response.body])  # one send, no copy
        cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


def direct_protocol(header_timeout: float) -> type[DirectProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    return type("DirectProtocol", (DirectProtocol,), {"header_timeout": header_timeout})
