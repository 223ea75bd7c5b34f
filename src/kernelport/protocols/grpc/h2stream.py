"""One HTTP/2 stream as the ASGI app sees it, and the write side of its connection.

:class:`Stream` is what ``receive`` and ``send`` work on: the request's DATA as it arrives,
and the response's HEADERS, DATA and trailers. It writes through the connection's
:class:`Outbox`: the flow-control windows towards the client, the frames queued for the
connection's next write (one per loop iteration), and the wait when the socket's buffer is
full. The reading side (frames in, streams opened and lost) is
:class:`~kernelport.protocols.grpc.http2.Connection`'s, which owns both.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kernelport.protocols.grpc import h2wire as h2

_DISCONNECT = {"type": "http.disconnect"}


class ResponseHeaders:
    """Header blocks, encoded once and reused by the answers that share their headers (most
    do); one per server."""

    def __init__(self) -> None:
        self._encoded: dict[Any, bytes] = {}

    def encode(self, status: int | None, headers: Any) -> bytes:
        key = (status, tuple(headers))
        block = self._encoded.get(key)
        if block is None:
            block = h2.encode_headers(status, headers)
            if len(self._encoded) >= 256:
                self._encoded.clear()
            self._encoded[key] = block
        return block


class Outbox:
    """The write side of one connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, headers: ResponseHeaders) -> None:
        self.loop = loop
        self.headers = headers
        self.transport: asyncio.Transport | None = None
        self.peer_window = h2.DEFAULT_WINDOW  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame = h2.DEFAULT_FRAME
        self.send_window = h2.DEFAULT_WINDOW  # the connection's, towards the client
        self.paused = False  # the transport's buffer is full
        self.frames: list[bytes | memoryview] = []
        self._flush_handle: asyncio.Handle | None = None
        self._window_waiters: list[asyncio.Future[None]] = []
        self._drained: asyncio.Future[None] | None = None

    def send_headers(self, stream_id: int, block: bytes, end: bool) -> None:
        flags = h2.END_STREAM if end else 0
        limit = self.peer_frame
        if len(block) <= limit:
            self.queue(
                h2.frame_header(h2.HEADERS, flags | h2.END_HEADERS, stream_id, len(block)), block
            )
            return
        pieces = [block[at : at + limit] for at in range(0, len(block), limit)]
        self.queue(h2.frame(h2.HEADERS, flags, stream_id, pieces[0]))
        for piece in pieces[1:-1]:
            self.queue(h2.frame(h2.CONTINUATION, 0, stream_id, piece))
        self.queue(h2.frame(h2.CONTINUATION, h2.END_HEADERS, stream_id, pieces[-1]))

    async def send_data(self, stream: Stream, body: bytes | memoryview, end: bool) -> None:
        size = len(body)
        if size <= stream.send_window and size <= self.send_window and size <= self.peer_frame:
            stream.send_window -= size
            self.send_window -= size
            self.queue(h2.frame_header(h2.DATA, h2.END_STREAM if end else 0, stream.id, size), body)
        else:
            view = memoryview(body)
            at = 0
            while at < size:
                room = min(stream.send_window, self.send_window, self.peer_frame, size - at)
                if room <= 0:
                    await self._window()
                    if stream.gone:
                        return
                    continue
                flags = h2.END_STREAM if end and at + room == size else 0
                self.queue(h2.frame_header(h2.DATA, flags, stream.id, room), view[at : at + room])
                stream.send_window -= room
                self.send_window -= room
                at += room
            if size == 0:
                self.queue(h2.frame_header(h2.DATA, h2.END_STREAM if end else 0, stream.id, 0))
        if self.paused and not stream.gone:  # the socket's buffer is full: wait for it
            if self._drained is None or self._drained.done():
                self._drained = self.loop.create_future()
            await self._drained

    async def _window(self) -> None:
        self.flush()
        waiter = self.loop.create_future()
        self._window_waiters.append(waiter)
        await waiter

    def windows_opened(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def grant(self, stream: Stream) -> None:
        """More room for a stream the app keeps up with (its bytes not taken are few)."""
        if stream.buffered < h2.STREAM_WINDOW // 2 and stream.recv_window < h2.STREAM_WINDOW // 2:
            increment = h2.STREAM_WINDOW - stream.recv_window
            stream.recv_window = h2.STREAM_WINDOW
            self.queue(h2.frame(h2.WINDOW_UPDATE, 0, stream.id, increment.to_bytes(4, "big")))

    def queue(self, *frames: bytes | memoryview) -> None:
        self.frames.extend(frames)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        out = self.frames
        if out and self.transport is not None:
            self.frames = []
            self.transport.writelines(out)

    def drained(self) -> None:
        """The transport takes writes again."""
        self.paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def lost(self) -> None:
        """The connection is gone: nothing waits for room any more."""
        self.windows_opened()
        self.drained()
        if self._flush_handle is not None:
            self._flush_handle.cancel()


class Stream:
    """One request and its response, as the ASGI app sees them (``receive``, ``send``)."""

    __slots__ = (
        "body", "buffered", "early", "ended", "finished", "given_end", "gone", "head", "id",
        "out", "recv_window", "send_window", "task", "trailers", "waiter",
    )  # fmt: skip

    def __init__(self, out: Outbox, stream_id: int) -> None:
        self.out = out
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
        self.send_window = out.peer_window
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
                    self.out.grant(self)
                return {"type": "http.request", "body": data, "more_body": more}
            if self.ended and not self.given_end:
                self.given_end = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.gone:
                return _DISCONNECT
            self.waiter = self.out.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone or self.finished:
            return  # the client went away: what would have been sent goes nowhere
        kind = message["type"]
        out = self.out
        if kind == "http.response.body":
            body = message.get("body", b"")
            end = not message.get("more_body", False) and not self.trailers
            head = self.head
            if head is not None:
                self.head = None
                if end and not body:  # a Trailers-Only response: the status is in the headers
                    out.send_headers(self.id, head, True)
                    self.finished = True
                    return
                out.send_headers(self.id, head, False)
            if body or end:
                await out.send_data(self, body, end)
            if end:
                self.finished = True
        elif kind == "http.response.start":
            self.head = out.headers.encode(message["status"], message.get("headers", ()))
            self.trailers = bool(message.get("trailers", False))
        elif kind == "http.response.trailers":
            if self.head is not None:
                out.send_headers(self.id, self.head, False)
                self.head = None
            out.send_headers(self.id, out.headers.encode(None, message.get("headers", ())), True)
            self.finished = True
