"""The HTTP/1.1 parser's callbacks for one connection, serving plain inference requests
(compiled by mypyc: ``native.py``).

uvicorn's protocol is httptools' callback object: for every request it builds an ASGI scope
in ``on_message_begin``, lower-cases and appends each header in a Python call, and parses
the URL again once the headers are complete. ``DirectProtocol`` (``direct.py``) already
answered plain inference requests without the ASGI cycle, but those interpreted callbacks
were still a quarter of the HTTP front end's core under load.

:class:`Http1Reader` takes the callbacks instead: the same httptools parser (llhttp judges
every byte, as before), with compiled callbacks that collect the URL and headers. Once the
headers are complete it decides: a plain inference (the rules of ``direct.py``) is kept
here, its body collected and answered by :meth:`Http1Reader.answer`; anything else is
replayed to uvicorn's protocol (``on_message_begin``, ``on_url``, each ``on_header``, then
``on_headers_complete``), which then receives the body's callbacks as it always did, so
uvicorn sees exactly the calls it would have seen.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import httptools

from kernelport.core.fill import Announcement
from kernelport.protocols.http_timeouts import MAX_HEAD_BYTES, HeadTooLarge
from kernelport.protocols.rest.inference import RestInference, error_response, plain_request

log = logging.getLogger("kernelport.http")

_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CLOSE = b"connection: close\r\n"


class _Settled:
    """Stands in for the ASGI cycle's event: uvicorn sets it when the connection is lost."""

    def set(self) -> None:
        pass


_SETTLED = _Settled()


class Inference:
    """One plain inference request, in the place uvicorn keeps its current cycle
    (``protocol.cycle``), so pipelining, shutdown and connection loss see it as one."""

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
        self.message_event = _SETTLED


class Http1Reader:
    """httptools' callbacks for one connection of ``protocol`` (a ``DirectProtocol``)."""

    def __init__(self, protocol: Any, rest: RestInference | None) -> None:
        self.protocol = protocol
        self.rest = rest  # None: every request is uvicorn's (an app that is not a RestApp)
        self.parser = httptools.HttpRequestParser(self)
        self.in_head = False  # a request has begun and its headers are not complete
        self.head_bytes = 0
        self.url = b""
        self.raw: list[tuple[bytes, bytes]] = []
        self.current: Inference | None = None  # None: the request is uvicorn's

    # httptools' callbacks

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.url = b""
        self.raw = []
        self.current = None

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        self.raw.append((name, value))

    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            self.protocol.head_too_large = True  # uvicorn's 400 for the error becomes 431
            raise HeadTooLarge

    def on_headers_complete(self) -> None:
        self.in_head = False
        inference = self._plain()
        protocol = self.protocol
        if inference is not None:
            self.current = inference
            protocol.cycle = inference
            protocol._header_deadline = 0.0
            return
        protocol.on_message_begin()
        protocol.on_url(self.url)
        for name, value in self.raw:
            protocol.on_header(name, value)
        protocol.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        current = self.current
        if current is None:
            self.protocol.on_body(body)
        else:
            current.chunks.append(body)  # at most the Content-Length, checked against the limit

    def on_message_complete(self) -> None:
        current = self.current
        protocol = self.protocol
        if current is None:
            protocol.on_message_complete()
            return
        self.current = None
        task = protocol.loop.create_task(self.answer(current))
        tasks = protocol.tasks
        task.add_done_callback(tasks.discard)
        tasks.add(task)

    # the plain inference path

    def _plain(self) -> Inference | None:
        """The request whose headers are complete, if it is a plain inference: HTTP/1.1
        POST to the infer route with no Expect or Upgrade, a Content-Length within the limit,
        no content or transfer coding (``plain_request``), and no request on this
        connection still being answered (a pipelined one queues in uvicorn)."""
        rest = self.rest
        parser = self.parser
        if (
            rest is None
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
        ):
            return None
        cycle = self.protocol.cycle
        if cycle is not None and not cycle.response_complete:
            return None
        headers = [(name.lower(), value) for name, value in self.raw]
        for name, _ in headers:
            if name == b"expect":
                return None  # uvicorn answers 100 Continue
        path = httptools.parse_url(self.url).path
        plain = plain_request(path, headers, rest.max_request_bytes)
        if plain is None:
            return None
        target, by_name = plain
        keep_alive = bool(parser.should_keep_alive())
        return Inference(target, by_name, keep_alive, rest.announce(target[0], target[1]))

    async def answer(self, cycle: Inference) -> None:
        """Run ``cycle`` through ``RestInference.response`` and write its answer in one send."""
        chunks = cycle.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        cycle.chunks = []
        model, version = cycle.target
        protocol = self.protocol
        rest = self.rest
        assert rest is not None  # only _plain() makes an Inference, and only with a RestApp
        try:
            response = await rest.response(
                model, version, cycle.headers, body, cycle.announced, protocol._watch
            )
        except Exception:
            log.exception("unhandled error on POST /v2/models/%s/infer", model)
            response = error_response(500, "internal server error")
        if cycle.disconnected:
            return
        flow = protocol.flow
        if flow.write_paused:
            await flow.drain()
            if cycle.disconnected:
                return
        head = [_STATUS[response.status]]
        for name, value in protocol.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        for name, value in response.headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"content-length: %d\r\n" % len(response.body))
        if not cycle.keep_alive:
            head.append(_CLOSE)
        head.append(b"\r\n")
        transport = protocol.transport
        transport.writelines([b"".join(head), response.body])  # one send, no copy
        cycle.response_complete = True
        if not cycle.keep_alive:
            transport.close()
        protocol.on_response_complete()
