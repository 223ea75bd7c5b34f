"""One HTTP/2 stream as the ASGI app sees it: ``receive`` hands over what has arrived, and
once the request has ended waits for a disconnect; ``send`` turns the app's messages into
HEADERS and DATA frames on its connection (:mod:`kernelport.protocols.grpc.http2`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from kernelport.protocols.grpc import h2wire as h2

if TYPE_CHECKING:
    from kernelport.protocols.grpc.http2 import Connection

_DISCONNECT = {"type": "http.disconnect"}


class Stream:
    """One request and its response, as the ASGI app sees them (``receive``, ``send``)."""

    __slots__ = (
        "body", "buffered", "conn", "early", "ended", "finished", "given_end", "gone", "head",
        "id", "recv_window", "send_window", "task", "trailers", "waiter",
    )  # fmt: skip

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.body: list[bytes | memoryview] = []
        self.buffered = 0  # bytes received the app has not taken yet
        self.ended = False  # the client's h2.END_STREAM has arrived
        self.given_end = False  # ... and the app has been told
        self.early: Any = None  # what the app's call_started gave for this call (released)
        self.gone = False  # reset by either side, or the connection is lost
        self.finished = False  # the response has ended
        self.head: bytes | None = None  # the response's header block, until it is sent
        self.trailers = False
        self.waiter: asyncio.Future[None] | None = None
        self.recv_window = h2.STREAM_WINDOW
        self.send_window = conn.peer_window
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        while True:
            if self.body:  # one DATA payload at a time: the app joins (once) what it must
                data = self.body.pop(0)
                self.buffered -= len(data)
                more = not self.ended or len(self.body) > 0
                self.given_end = not more
                if not self.ended:
                    self.conn.grant(self)
                return {"type": "http.request", "body": data, "more_body": more}
            if self.ended and not self.given_end:
                self.given_end = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.gone:
                return _DISCONNECT
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone or self.finished:
            return  # the client went away: what would have been sent goes nowhere
        kind = message["type"]
        conn = self.conn
        if kind == "http.response.body":
            body = message.get("body", b"")
            end = not message.get("more_body", False) and not self.trailers
            head = self.head
            if head is not None:
                self.head = None
                if end and not body:  # a Trailers-Only response: the status is in the headers
                    conn.send_headers(self.id, head, True)
                    self.finished = True
                    return
                conn.send_headers(self.id, head, False)
            if body or end:
                await conn.send_data(self, body, end)
            if end:
                self.finished = True
        elif kind == "http.response.start":
            self.head = conn.server.encode(message["status"], message.get("headers", ()))
            self.trailers = bool(message.get("trailers", False))
        elif kind == "http.response.trailers":
            if self.head is not None:
                conn.send_headers(self.id, self.head, False)
                self.head = None
            conn.send_headers(self.id, conn.server.encode(None, message.get("headers", ())), True)
            self.finished = True
