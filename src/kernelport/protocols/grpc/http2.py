"""An HTTP/2 server on the event loop, for the gRPC front end (``--grpc-transport asyncio``).

Why not a library: grpcio's asyncio server costs ~270 us of the core per call, Envoy through
pyvoy ~70 us plus four thread hand-offs per call, and the sans-IO ``h2`` package ~160 us
for an echo; this server answers the same echo in ~24 us (bench/RESULTS.md, "gRPC on the
event loop"). What makes the difference is doing only what gRPC needs: HPACK decoding is the
``hpack`` package's (with the decoded list reused while a client repeats a block of indexed
fields, as gRPC clients do), responses are encoded without the dynamic table, and each
connection writes once per loop iteration.

It serves an ASGI application with the ``http.response.trailers`` extension (``GrpcAsgiApp``)
the way pyvoy does, so every gRPC semantic (deadlines, compression, status trailers, streams,
API keys) lives in one place for both transports. Per stream, ``receive()`` hands over what
has arrived, and once the request has ended waits for a disconnect; a client's RST_STREAM or
a lost connection cancels the stream's task, which drops its queued work.

Written from RFC 9113 (HTTP/2) and RFC 7541 (HPACK). Limits: ``SERVER_SETTINGS``; flow
control windows bound what a client can make the server buffer.

Here: the connection's reading side (frames in, streams opened, reset and lost) and the
listening server. ``h2stream``: a stream as the app sees it and the connection's write side
(windows, queued frames, back-pressure); ``h2wire``: frames, settings and header blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

from kernelport.protocols.grpc import h2wire as h2
from kernelport.protocols.grpc.h2stream import Outbox, ResponseHeaders, Stream
from kernelport.protocols.listen import bind
from kernelport.protocols.tls import TlsFiles

log = logging.getLogger("kernelport.grpc")

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_EXTENSIONS: dict[str, Any] = {"http.response.trailers": {}}

App = Callable[[dict[str, Any], Any, Any], Coroutine[Any, Any, None]]
#: the scope key of what the app's ``call_started`` returned for the call
EARLY: Final = "kernelport.early"


class Connection(asyncio.Protocol):
    """One client connection: frames in, frames out, streams in between."""

    def __init__(self, server: Http2Server) -> None:
        self.server = server
        self.loop = server.loop
        self.app = server.app
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.out = Outbox(self.loop, server.headers)
        self.last_stream = 0  # the highest stream id the client opened
        self.recv_window = h2.CONNECTION_WINDOW
        self.last_active = self.loop.time()
        self._blocks = h2.HeaderBlocks()
        self._preface = False
        self._tail = bytearray()  # the start of a h2.frame not yet whole
        self._need = 0  # bytes _tail must hold before it is worth parsing again
        self._header_block: tuple[int, int, bytearray] | None = None  # h2.CONTINUATION pending
        self._owed = 0  # control answers queued while paused
        self._closing = False  # h2.GOAWAY sent: no new streams
        self._resets: list[float] = []
        self._scope: dict[str, Any] = {}

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.out.transport = transport
        self._scope = {
            "type": "http", "asgi": _ASGI, "http_version": "2", "scheme":
            "https" if transport.get_extra_info("sslcontext") is not None else "http",
            "client": transport.get_extra_info("peername"),
            "server": transport.get_extra_info("sockname"), "root_path": "",
            "query_string": b"", "extensions": _EXTENSIONS,
        }  # fmt: skip
        settings = b"".join(struct.pack(">HI", k, v) for k, v in h2.SERVER_SETTINGS.items())
        increment = struct.pack(">I", h2.CONNECTION_WINDOW - h2.DEFAULT_WINDOW)
        transport.writelines(
            (h2.frame(h2.SETTINGS, 0, 0, settings), h2.frame(h2.WINDOW_UPDATE, 0, 0, increment))
        )
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._closing = True
        for stream in list(self.streams.values()):
            self._lose(stream)
        self.streams.clear()
        self.out.lost()
        self.server.closed()

    def pause_writing(self) -> None:
        self.out.paused = True

    def resume_writing(self) -> None:
        self._owed = 0
        self.out.drained()

    def data_received(self, data: bytes | bytearray) -> None:
        self.last_active = self.loop.time()
        if self._tail:
            self._tail += data
            if len(self._tail) < self._need:
                return
            # Parsed where it lies: payload views keep it alive, and it is never resized again
            data, self._tail = self._tail, bytearray()
        try:
            if not self._preface:
                if len(data) < len(h2.PREFACE):
                    if not h2.PREFACE.startswith(data):
                        raise h2.ConnectionError_(
                            h2.PROTOCOL_ERROR, "not an HTTP/2 connection preface"
                        )
                    self._tail, self._need = bytearray(data), len(h2.PREFACE)
                    return
                if not data.startswith(h2.PREFACE):
                    raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._preface = True
                data = data[len(h2.PREFACE) :]
            self._frames(data)
        except h2.ConnectionError_ as exc:
            self.fail(exc.code, str(exc))
            return
        if self.out.frames:
            self.out.flush()

    # ------------------------------------------------------------------------ frames in
    def _frames(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        pos, end = 0, len(data)
        touched: list[Stream] = []
        while end - pos >= 9:
            size = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
            if size > h2.FRAME_LIMIT:
                raise h2.ConnectionError_(
                    h2.FRAME_SIZE_ERROR, f"a frame of {size} bytes (limit {h2.FRAME_LIMIT})"
                )
            if end - pos - 9 < size:
                break
            kind, flags = data[pos + 3], data[pos + 4]
            stream_id = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            start = pos + 9
            pos = start + size
            if self._header_block is not None and kind != h2.CONTINUATION:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "a header block interrupted")
            if kind == h2.DATA:
                stream = self._data(stream_id, flags, view[start:pos], size)
                if stream is not None and not stream.ended:
                    touched.append(stream)
            elif kind == h2.HEADERS:
                self._headers(stream_id, flags, view[start:pos])
            elif kind == h2.CONTINUATION:
                self._continuation(stream_id, flags, view[start:pos])
            else:
                self._control(kind, flags, stream_id, view[start:pos])
        if pos < end:
            self._tail = bytearray(view[pos:])
            self._need = (
                9
                if end - pos < 9
                else 9 + ((data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2])
            )
        for stream in touched:
            self.out.grant(stream)
        if self.recv_window < h2.CONNECTION_WINDOW // 2:
            increment = h2.CONNECTION_WINDOW - self.recv_window
            self.recv_window = h2.CONNECTION_WINDOW
            self.out.frames.append(h2.frame(h2.WINDOW_UPDATE, 0, 0, increment.to_bytes(4, "big")))

    def _data(self, stream_id: int, flags: int, payload: memoryview, size: int) -> Stream | None:
        if stream_id == 0:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "DATA on stream 0")
        self.recv_window -= size
        if self.recv_window < 0:
            raise h2.ConnectionError_(h2.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return None  # a stream already reset or answered: dropped
        if stream.ended:
            self._reset(stream, h2.STREAM_CLOSED)
            return None
        stream.recv_window -= size
        if stream.recv_window < 0:
            self._reset(stream, h2.FLOW_CONTROL_ERROR)
            return None
        if flags & h2.PADDED:
            payload = h2.unpad(payload)
        if payload:
            stream.body.append(payload)
            stream.buffered += len(payload)
        if flags & h2.END_STREAM:
            stream.ended = True
        stream.wake()
        return stream

    def _headers(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        if flags & h2.PADDED:
            payload = h2.unpad(payload)
        if flags & h2.PRIORITY_FLAG:
            payload = payload[5:]
        if not flags & h2.END_HEADERS:
            self._header_block = (stream_id, flags, bytearray(payload))
            return
        self._open(stream_id, flags, bytes(payload))

    def _continuation(self, stream_id: int, flags: int, payload: memoryview) -> None:
        pending = self._header_block
        if pending is None or pending[0] != stream_id:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        pending[2].extend(payload)
        if len(pending[2]) > h2.HEADER_LIST_LIMIT:
            raise h2.ConnectionError_(h2.ENHANCE_YOUR_CALM, "header block over the limit")
        if flags & h2.END_HEADERS:
            self._header_block = None
            self._open(stream_id, pending[1], bytes(pending[2]))

    def _open(self, stream_id: int, flags: int, block: bytes) -> None:
        method, path, headers = self._blocks.decode(block)  # always: the table must stay in step
        stream = self.streams.get(stream_id)
        if stream is not None or stream_id <= self.last_stream:
            # Trailers from the client: they end its half of the stream
            if not flags & h2.END_STREAM:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"HEADERS again on stream {stream_id}")
            if stream is not None and not stream.ended:
                stream.ended = True
                stream.wake()
            return
        self.last_stream = stream_id
        if self._closing or len(self.streams) >= h2.MAX_STREAMS:
            self.out.frames.append(
                h2.frame(h2.RST_STREAM, 0, stream_id, h2.REFUSED_STREAM.to_bytes(4, "big"))
            )
            return
        stream = Stream(self.out, stream_id)
        stream.ended = bool(flags & h2.END_STREAM)
        self.streams[stream_id] = stream
        scope = self._scope.copy()
        scope["method"], scope["path"], scope["raw_path"], scope["headers"] = (
            method, path.decode("latin-1"), path, headers,
        )  # fmt: skip
        started = self.server.call_started
        if started is not None and (early := started(scope)) is not None:
            # Known before the task first runs: a batch cut in between sees this call coming
            scope[EARLY] = stream.early = early
        task = self.loop.create_task(self.app(scope, stream.receive, stream.send))
        stream.task = task
        task.add_done_callback(functools.partial(self._done, stream))

    def _control(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if kind == h2.SETTINGS:
            if stream_id != 0:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & h2.ACK:
                return
            if len(payload) % 6:
                raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "SETTINGS of a bad length")
            for at in range(0, len(payload), 6):
                key, value = struct.unpack_from(">HI", payload, at)
                self._setting(key, value)
            self._owe(h2.frame(h2.SETTINGS, h2.ACK, 0))
        elif kind == h2.WINDOW_UPDATE:
            if len(payload) != 4:
                raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "WINDOW_UPDATE of a bad length")
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if stream_id == 0:
                if increment == 0:
                    raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
                self.out.send_window += increment
                if self.out.send_window > h2.MAX_WINDOW:
                    raise h2.ConnectionError_(h2.FLOW_CONTROL_ERROR, "connection window overflow")
            else:
                stream = self.streams.get(stream_id)
                if stream is None:
                    return
                stream.send_window += increment
                if increment == 0 or stream.send_window > h2.MAX_WINDOW:
                    self._reset(
                        stream, h2.PROTOCOL_ERROR if increment == 0 else h2.FLOW_CONTROL_ERROR
                    )
            self.out.windows_opened()
        elif kind == h2.PING:
            if len(payload) != 8 or stream_id != 0:
                raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "a bad PING")
            if not flags & h2.ACK:
                self._owe(h2.frame(h2.PING, h2.ACK, 0, bytes(payload)))
        elif kind == h2.RST_STREAM:
            if len(payload) != 4 or stream_id == 0:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "a bad RST_STREAM")
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._lose(stream)
            now = self.loop.time()
            self._resets = [t for t in self._resets if now - t < h2.RESET_SPAN_S]
            self._resets.append(now)
            if len(self._resets) > h2.RESET_BUDGET:
                raise h2.ConnectionError_(h2.ENHANCE_YOUR_CALM, "too many stream resets")
        elif kind == h2.GOAWAY:
            self._closing = True
            if not self.streams:
                self.close()
        elif kind == h2.PUSH_PROMISE:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "a client cannot push")
        elif kind == h2.PRIORITY and len(payload) != 5:
            raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "PRIORITY of a bad length")
        # unknown h2.frame types are ignored (RFC 9113 4.1)

    def _owe(self, reply: bytes) -> None:
        """An answer the client asked for; one that keeps asking without reading is cut off."""
        if self.out.paused:
            self._owed += 1
            if self._owed > h2.CONTROL_BUDGET:
                raise h2.ConnectionError_(h2.ENHANCE_YOUR_CALM, "control frames not read")
        self.out.frames.append(reply)

    def _setting(self, key: int, value: int) -> None:
        if key == h2.INITIAL_WINDOW_SIZE:
            if value > h2.MAX_WINDOW:
                raise h2.ConnectionError_(
                    h2.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large"
                )
            delta = value - self.out.peer_window
            self.out.peer_window = value
            for stream in self.streams.values():
                stream.send_window += delta
            self.out.windows_opened()
        elif key == h2.MAX_FRAME_SIZE:
            if not h2.DEFAULT_FRAME <= value <= 16_777_215:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
            self.out.peer_frame = value

    # ------------------------------------------------------------------------ streams
    def _done(self, stream: Stream, task: asyncio.Task[None]) -> None:
        if stream.early is not None:  # a call cancelled before it ran has not released it
            stream.early.release()
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("gRPC stream %d failed", stream.id, exc_info=exc)
        if not stream.gone:
            if not stream.finished:  # the app ended without a response: the stream is reset
                self._reset(stream, h2.INTERNAL_ERROR)
            elif not stream.ended:  # answered before the client finished sending
                self._reset(stream, h2.NO_ERROR)
        if self._closing and not self.streams:
            self.close()

    def _reset(self, stream: Stream, code: int) -> None:
        self.out.queue(h2.frame(h2.RST_STREAM, 0, stream.id, code.to_bytes(4, "big")))
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        self._lose(stream)

    def _lose(self, stream: Stream) -> None:
        """The stream is gone: its app task's work is dropped."""
        if stream.gone:
            return
        stream.gone = True
        stream.wake()
        if stream.task is not None and not stream.task.done() and not stream.finished:
            stream.task.cancel()

    def go_away(self, code: int = h2.NO_ERROR, message: str = "") -> None:
        """Refuse new streams; close once the open ones are done."""
        if self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        payload = struct.pack(">II", self.last_stream, code) + message.encode()[:256]
        self.out.queue(h2.frame(h2.GOAWAY, 0, 0, payload))
        if not self.streams:
            self.close()

    def fail(self, code: int, message: str) -> None:
        log.debug("HTTP/2 connection error %d: %s", code, message)
        if self.out.paused:  # a client that does not read would hold the close open forever
            self.abort()
            return
        self.go_away(code, message)
        self.close()

    def close(self) -> None:
        self.out.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        for stream in list(self.streams.values()):
            self._lose(stream)
        if self.transport is not None:
            self.transport.abort()


class Http2Server:
    """Listens for HTTP/2 (cleartext with prior knowledge, or TLS with ALPN ``h2``) and
    serves ``app``. Connections idle for ``idle_timeout`` seconds, or that have not sent the
    connection preface within ``handshake_timeout``, are closed."""

    def __init__(
        self,
        app: App,
        *,
        tls: TlsFiles | None = None,
        idle_timeout: float = 300.0,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.app = app
        #: the app's ``call_started(scope)``, if it has one: called as a call's headers
        #: arrive, before its task first runs; what it returns (with ``release()``) is in
        #: the scope under ``EARLY`` and released when the call ends
        self.call_started: Callable[[dict[str, Any]], Any] | None = getattr(
            app, "call_started", None
        )
        self.loop: asyncio.AbstractEventLoop  # the running loop, from start()
        self.connections: set[Connection] = set()
        self._tls = tls
        self._idle = idle_timeout
        self._handshake = handshake_timeout
        self._servers: list[asyncio.Server] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        self.headers = ResponseHeaders()

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port bound."""
        self.loop = asyncio.get_running_loop()
        context = self._tls.server_context(["h2"]) if self._tls is not None else None
        sock = bind(host, port, reuse_port)
        server = await self.loop.create_server(
            lambda: Connection(self), sock=sock, ssl=context, backlog=2048
        )
        self._servers.append(server)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._tick(), self._on_sweep)
        return int(sock.getsockname()[1])

    def _tick(self) -> float:
        return max(0.05, min(self._idle, self._handshake) / 4)

    def _on_sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            quiet = now - conn.last_active
            if not conn._preface and quiet > self._handshake:
                conn.abort()
            elif not conn.streams and quiet > self._idle:
                conn.go_away(h2.NO_ERROR, "idle")
        self._sweep = self.loop.call_later(self._tick(), self._on_sweep)

    def closed(self) -> None:
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    async def stop(self, grace: float) -> None:
        """Stop listening, tell every client to go away, wait up to ``grace`` seconds for the
        streams in flight, then cut what is left."""
        if self._sweep is not None:
            self._sweep.cancel()
        for server in self._servers:
            server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.go_away(h2.NO_ERROR, "server shutting down")
        if self.connections and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()
