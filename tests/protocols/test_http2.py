"""The HTTP/2 server on the event loop (``protocols/grpc/http2.py``), over real sockets.

The client is the ``h2`` package (an independent HTTP/2 implementation) for well-formed
traffic, and frames built with ``hyperframe`` and ``hpack`` for what a well-behaved client
never sends. The app is a small ASGI app, so these tests are about the transport; the gRPC
semantics over it are the e2e suite's (``KERNELPORT_GRPC_TRANSPORT=asyncio``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from kernelport.protocols.grpc import h2wire
from kernelport.protocols.grpc.http2 import EARLY, Http2Server

OK = [(b"grpc-status", b"0")]
_WRITERS: list[asyncio.StreamWriter] = []  # every test connection, closed after its test


@pytest.fixture(autouse=True)
async def _close_connections() -> AsyncIterator[None]:
    yield
    while _WRITERS:
        writer = _WRITERS.pop()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class App:
    """Behaviour by path: /echo answers the body, /big N bytes (header ``size``), /hang waits
    until released (recording a cancellation), /stall reads nothing until released, /only
    answers Trailers-Only, /fail raises."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.release = asyncio.Event()
        self.started = 0
        self._moved: asyncio.Future[None] | None = None
        self.tokens: list[Token] = []  # one per call, from call_started
        self.ran_after: list[bool] = []  # per call run: its token was made before it ran

    def call_started(self, scope: dict[str, Any]) -> Token | None:
        if scope["path"] == "/quiet":
            return None
        self.tokens.append(Token(self._move))
        self._move()
        return self.tokens[-1]

    async def until(self, condition: Any, what: str) -> None:
        """Wait (at most 10 s) until ``condition()`` holds after the app's counts moved."""

        async def wait() -> None:
            while not condition():
                self._moved = asyncio.get_running_loop().create_future()
                await self._moved

        try:
            await asyncio.wait_for(wait(), 10)
        except TimeoutError:
            raise AssertionError(f"never happened: {what}") from None

    def _move(self) -> None:
        if self._moved is not None and not self._moved.done():
            self._moved.set_result(None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        early = scope.get(EARLY)
        self.ran_after.append(early is not None and early is self.tokens[-1] and not early.released)
        if path == "/stall":  # reads nothing until released
            await self.release.wait()
        body = b""
        while True:
            event = await receive()
            assert event["type"] == "http.request"
            body += event["body"]
            if not event["more_body"]:
                break
        if path == "/hang":
            self.started += 1
            self._move()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                self._move()
                raise
        if path == "/fail":
            raise RuntimeError("the app failed")
        if path == "/only":
            headers = [(b"content-type", b"application/grpc"), (b"grpc-status", b"5")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/big":
            size = int(dict(scope["headers"])[b"size"])
            body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        headers = [(b"content-type", b"application/grpc"), (b"path", path.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers,
                    "trailers": True})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
        await send({"type": "http.response.trailers", "headers": OK})


class Token:
    """What App.call_started hands the server: counts its releases (and wakes App.until)."""

    def __init__(self, moved: Any) -> None:
        self.released = 0
        self._moved = moved

    def release(self) -> None:
        self.released += 1
        self._moved()


class Client:
    """An ``h2`` client connection that sends bodies as the server's windows allow and
    acknowledges what it reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        _WRITERS.append(writer)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.responses: dict[int, dict[str, Any]] = {}
        self.outgoing: dict[int, memoryview] = {}  # what is left to send, by stream
        self.others: list[Any] = []
        self.flush()

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def flush(self) -> None:
        for sid, rest in list(self.outgoing.items()):
            while rest:
                room = min(self.conn.local_flow_control_window(sid),
                           self.conn.max_outbound_frame_size, len(rest))  # fmt: skip
                if room <= 0:
                    break
                self.conn.send_data(sid, bytes(rest[:room]), end_stream=room == len(rest))
                rest = rest[room:]
            if rest:
                self.outgoing[sid] = rest
            else:
                del self.outgoing[sid]
        self.writer.write(self.conn.data_to_send())

    def send(self, path: str, body: bytes = b"", headers: Any = ()) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                     (b":path", path.encode()), (b":authority", b"test"),
                                     *headers], end_stream=not body)  # fmt: skip
        self.responses[sid] = {"headers": None, "data": bytearray(), "trailers": None,
                               "done": False, "reset": None}  # fmt: skip
        if body:
            self.outgoing[sid] = memoryview(body)
        self.flush()
        return sid

    async def pump(self) -> None:
        data = await asyncio.wait_for(self.reader.read(1 << 20), 10)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        for event in self.conn.receive_data(data):
            answer = self.responses.get(getattr(event, "stream_id", 0))
            if isinstance(event, h2.events.ResponseReceived):
                answer["headers"] = dict(event.headers)  # type: ignore[index]
            elif isinstance(event, h2.events.DataReceived):
                answer["data"] += event.data  # type: ignore[index]
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                answer["trailers"] = dict(event.headers)  # type: ignore[index]
            elif isinstance(event, h2.events.StreamEnded):
                answer["done"] = True  # type: ignore[index]
            elif isinstance(event, h2.events.StreamReset) and answer is not None:
                answer["done"], answer["reset"] = True, event.error_code
            else:
                self.others.append(event)
        self.flush()

    async def wait(self, sid: int) -> dict[str, Any]:
        while not self.responses[sid]["done"]:
            await self.pump()
        return self.responses[sid]

    async def call(self, path: str, body: bytes = b"", **headers: str) -> dict[str, Any]:
        return await self.wait(self.send(path, body, [(k.encode(), v.encode())
                                                      for k, v in headers.items()]))  # fmt: skip

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class Raw:
    """A client that writes frames as given (hyperframe) and reads the server's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        _WRITERS.append(writer)
        self.encoder = Encoder()
        self.buffer = b""

    @classmethod
    async def open(cls, port: int, preface: bool = True) -> Raw:
        raw = cls(*await asyncio.open_connection("127.0.0.1", port))
        if preface:
            raw.write(h2wire.PREFACE, SettingsFrame(0))
        return raw

    def write(self, *frames: Frame | bytes) -> None:
        for item in frames:
            self.writer.write(item if isinstance(item, bytes) else item.serialize())

    def block(self, path: str = "/echo", **extra: str) -> bytes:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", "t"), *extra.items()]  # fmt: skip
        return bytes(self.encoder.encode(headers))

    async def next(self) -> Frame | None:
        """The server's next frame; None once it closed the connection."""
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
            data = await asyncio.wait_for(self.reader.read(1 << 16), 10)
            if not data:
                return None
            self.buffer += data
        frame, size = Frame.parse_frame_header(memoryview(self.buffer[:9]))
        frame.parse_body(memoryview(self.buffer[9 : 9 + size]))
        self.buffer = self.buffer[9 + size :]
        return frame

    async def until(self, kind: type[Frame]) -> Frame:
        while True:
            frame = await self.next()
            assert frame is not None, f"closed before a {kind.__name__}"
            if isinstance(frame, kind):
                return frame

    async def goaway(self) -> GoAwayFrame:
        frame = await self.until(GoAwayFrame)
        assert isinstance(frame, GoAwayFrame)
        return frame


@pytest.fixture
async def served() -> AsyncIterator[tuple[Http2Server, App, int]]:
    app = App()
    server = Http2Server(app)
    port = await server.start("127.0.0.1", 0)
    yield server, app, port
    app.release.set()
    await server.stop(1)


async def test_a_request_is_answered_with_headers_body_and_trailers(served: Any) -> None:
    _, _, port = served
    client = await Client.open(port)
    answer = await client.call("/echo", b"hello")
    assert answer["headers"][b":status"] == b"200"
    assert answer["headers"][b"content-type"] == b"application/grpc"
    assert bytes(answer["data"]) == b"hello"
    assert answer["trailers"] == {b"grpc-status": b"0"}
    await client.close()


async def test_repeated_and_changing_header_blocks_decode_right(served: Any) -> None:
    # The same request again and again is decoded once (all indexed fields); new fields
    # change the dynamic table, and the next blocks must read with the new table.
    _, _, port = served
    client = await Client.open(port)
    for i in range(40):
        path = "/echo" if i % 3 else "/big"
        extra = {"size": str(100 + i % 5)} if path == "/big" else {"n": str(i % 4)}
        answer = await client.call(path, b"x" * i, **extra)
        assert answer["headers"][b"path"] == path.encode()
        assert len(answer["data"]) == (100 + i % 5 if path == "/big" else i)
    await client.close()


async def test_trailers_only_answer_ends_in_its_headers(served: Any) -> None:
    _, _, port = served
    client = await Client.open(port)
    answer = await client.call("/only")
    assert answer["headers"][b"grpc-status"] == b"5"
    assert answer["data"] == b"" and answer["trailers"] is None
    await client.close()


async def test_bodies_larger_than_every_window_flow_in_both_directions(served: Any) -> None:
    # 10 MiB each way: past the server's stream window (4 MiB), the client's (64 KiB) and
    # the client's largest frame (16 KiB), so both sides must wait for WINDOW_UPDATEs.
    _, _, port = served
    client = await Client.open(port)
    body = bytes(range(256)) * (10 * 4096)
    answer = await client.call("/echo", body)
    assert bytes(answer["data"]) == body
    answer = await client.call("/big", size=str(3 << 20))
    assert len(answer["data"]) == 3 << 20
    await client.close()


async def test_a_client_reset_cancels_the_stream_task(served: Any) -> None:
    _, app, port = served
    client = await Client.open(port)
    sid = client.send("/hang", b"x")
    await app.until(lambda: app.started == 1, "app.started == 1")
    client.conn.reset_stream(sid)
    client.flush()
    await app.until(lambda: app.cancelled == 1, "app.cancelled == 1")
    assert (await client.call("/echo", b"still"))["data"] == b"still"  # the connection serves on
    await client.close()


async def test_a_lost_connection_cancels_its_streams(served: Any) -> None:
    server, app, port = served
    client = await Client.open(port)
    client.send("/hang", b"x")
    client.send("/hang", b"y")
    await app.until(lambda: app.started == 2, "app.started == 2")
    await client.close()
    await app.until(
        lambda: app.cancelled == 2 and not server.connections,
        "app.cancelled == 2 and not server.connections",
    )


async def test_an_app_that_fails_resets_its_stream_only(served: Any) -> None:
    _, _, port = served
    client = await Client.open(port)
    answer = await client.call("/fail", b"x")
    assert answer["reset"] == h2wire.INTERNAL_ERROR
    assert (await client.call("/echo", b"next"))["data"] == b"next"
    await client.close()


async def test_ping_is_answered(served: Any) -> None:
    _, _, port = served
    raw = await Raw.open(port)
    raw.write(PingFrame(0, opaque_data=b"12345678"))
    pong = await raw.until(PingFrame)
    assert "ACK" in pong.flags and pong.opaque_data == b"12345678"


async def test_streams_past_the_limit_are_refused(served: Any) -> None:
    _, app, port = served
    raw = await Raw.open(port)
    for i in range(h2wire.MAX_STREAMS + 1):
        raw.write(HeadersFrame(2 * i + 1, raw.block("/hang"), flags=["END_HEADERS", "END_STREAM"]))
    refused = await raw.until(RstStreamFrame)
    assert refused.stream_id == 2 * h2wire.MAX_STREAMS + 1
    assert refused.error_code == h2wire.REFUSED_STREAM
    await app.until(lambda: app.started == h2wire.MAX_STREAMS, "app.started == h2wire.MAX_STREAMS")


async def test_a_rapid_reset_flood_is_told_to_go_away(served: Any) -> None:
    _, _, port = served
    raw = await Raw.open(port)
    for i in range(h2wire.RESET_BUDGET + 1):
        raw.write(HeadersFrame(2 * i + 1, raw.block("/hang"), flags=["END_HEADERS", "END_STREAM"]),
                  RstStreamFrame(2 * i + 1, error_code=h2wire.CANCEL))  # fmt: skip
    assert (await raw.goaway()).error_code == h2wire.ENHANCE_YOUR_CALM
    assert await _closed(raw)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        # a frame larger than the server allows
        (lambda raw: [(h2wire.FRAME_LIMIT + 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"],
         h2wire.FRAME_SIZE_ERROR),
        # a header block interrupted by another frame
        (lambda raw: [HeadersFrame(1, raw.block()[:2]), PingFrame(0, b"12345678")],
         h2wire.PROTOCOL_ERROR),
        # a header block that is not HPACK
        (lambda raw: [HeadersFrame(1, b"\xff\xff\xff\xff\xff\xff", flags=["END_HEADERS"])],
         h2wire.COMPRESSION_ERROR),
        # a header list over the limit
        (lambda raw: [HeadersFrame(1, raw.block(big="v" * h2wire.HEADER_LIST_LIMIT),
                                   flags=["END_HEADERS"])],
         h2wire.COMPRESSION_ERROR),
        # a window grown past 2^31 - 1
        (lambda raw: [WindowUpdateFrame(0, 2**31 - 1)], h2wire.FLOW_CONTROL_ERROR),
        # DATA on a stream never opened
        (lambda raw: [DataFrame(5, b"x")], h2wire.PROTOCOL_ERROR),
        # a stream id that is even
        (lambda raw: [HeadersFrame(2, raw.block(), flags=["END_HEADERS"])],
         h2wire.PROTOCOL_ERROR),
    ],
    ids=["oversized-frame", "interrupted-block", "bad-hpack", "header-list", "window-overflow",
         "idle-stream", "even-stream"],
)  # fmt: skip
async def test_protocol_violations_end_the_connection_with_goaway(
    served: Any, frames: Any, code: int
) -> None:
    _, _, port = served
    raw = await Raw.open(port)
    raw.write(*frames(raw))
    assert (await raw.goaway()).error_code == code
    assert await _closed(raw)
    client = await Client.open(port)  # the server serves on
    assert (await client.call("/echo", b"ok"))["data"] == b"ok"
    await client.close()


async def test_a_client_that_asks_without_reading_is_cut_off(served: Any) -> None:
    # PINGs answered while the answers back up unread: small socket buffers on both ends so
    # the server's writes back up after a few thousand answers, then CONTROL_BUDGET more.
    server, _, port = served
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    raw = Raw(*await asyncio.open_connection(sock=sock))
    raw.write(h2wire.PREFACE, SettingsFrame(0), PingFrame(0, opaque_data=b"12345678"))
    await raw.until(PingFrame)  # the server has the connection by now
    (conn,) = server.connections
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    for _ in range(200):  # writing on while the loop lets the server read and answer
        raw.writer.write(ping * 1000)
        await raw.writer.drain()
        await asyncio.sleep(0)
        if not server.connections:
            break
    assert not server.connections
    assert await _closed(raw)


async def test_not_http2_is_closed(served: Any) -> None:
    _, _, port = served
    raw = await Raw.open(port, preface=False)
    raw.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await _closed(raw)


async def test_continuation_padding_priority_and_client_trailers(served: Any) -> None:
    _, _, port = served
    raw = await Raw.open(port)
    block = raw.block("/echo", pad="p" * 40)
    # HEADERS (padded, with priority) + two CONTINUATIONs, DATA padded, trailers end it
    raw.write(
        HeadersFrame(1, block[:5], flags=["PADDED", "PRIORITY"], pad_length=7, depends_on=0,
                     stream_weight=16),
        ContinuationFrame(1, block[5:20]),
        ContinuationFrame(1, block[20:], flags=["END_HEADERS"]),
        DataFrame(1, b"abc", flags=["PADDED"], pad_length=10),
        DataFrame(1, b"def"),
        HeadersFrame(1, raw.block("/ignored"), flags=["END_HEADERS", "END_STREAM"]),
    )  # fmt: skip
    decoder = Decoder()
    body = b""
    while True:
        frame = await raw.next()
        assert frame is not None
        if isinstance(frame, DataFrame):
            body += frame.data
        if isinstance(frame, HeadersFrame):
            headers = dict(decoder.decode(frame.data, raw=True))
            if "END_STREAM" in frame.flags:
                assert headers == {b"grpc-status": b"0"}
                break
            assert headers[b"path"] == b"/echo"
    assert body == b"abcdef"


async def test_data_beyond_a_stream_window_resets_the_stream(served: Any) -> None:
    _, _, port = served
    raw = await Raw.open(port)
    raw.write(HeadersFrame(1, raw.block("/stall"), flags=["END_HEADERS"]))
    chunk = b"x" * h2wire.FRAME_LIMIT
    raw.write(*[DataFrame(1, chunk) for _ in range(h2wire.STREAM_WINDOW // len(chunk) + 1)])
    reset = await raw.until(RstStreamFrame)
    assert (reset.stream_id, reset.error_code) == (1, h2wire.FLOW_CONTROL_ERROR)


async def test_idle_and_silent_connections_are_closed() -> None:
    server = Http2Server(App(), idle_timeout=0.1, handshake_timeout=0.1)
    port = await server.start("127.0.0.1", 0)
    try:
        idle = await Raw.open(port)
        assert (await idle.goaway()).error_code == h2wire.NO_ERROR
        assert await _closed(idle)
        silent = await Raw.open(port, preface=False)
        assert await _closed(silent)
    finally:
        await server.stop(0)


async def test_stop_lets_streams_in_flight_finish_and_refuses_new_ones(served: Any) -> None:
    server, app, port = served
    raw = await Raw.open(port)
    raw.write(HeadersFrame(1, raw.block("/hang"), flags=["END_HEADERS", "END_STREAM"]))
    await app.until(lambda: app.started == 1, "the stream started")
    stopping = asyncio.ensure_future(server.stop(10))
    goaway = await raw.goaway()
    assert (goaway.last_stream_id, goaway.error_code) == (1, h2wire.NO_ERROR)
    raw.write(HeadersFrame(3, raw.block("/echo"), flags=["END_HEADERS", "END_STREAM"]))
    refused = await raw.until(RstStreamFrame)
    assert (refused.stream_id, refused.error_code) == (3, h2wire.REFUSED_STREAM)
    app.release.set()
    decoder = Decoder()
    while True:  # stream 1 is answered in full, then the connection closes
        frame = await raw.until(HeadersFrame)
        headers = dict(decoder.decode(frame.data, raw=True))
        if "END_STREAM" in frame.flags:
            assert (frame.stream_id, headers) == (1, {b"grpc-status": b"0"})
            break
    assert await _closed(raw)
    await stopping
    assert not server.connections
    with pytest.raises(OSError):
        await Client.open(port)


def test_encoded_headers_read_back_with_any_decoder() -> None:
    headers = [(b"grpc-status", b"13"), (b"grpc-message", b"m" * 300), (b"x" * 200, b"")]
    for status in (200, 415, None):
        block = h2wire.encode_headers(status, headers)
        decoded = Decoder().decode(block, raw=True)
        expected = ([(b":status", b"%d" % status)] if status is not None else []) + headers
        assert decoded == expected


async def _closed(raw: Raw) -> bool:
    """True once the server has closed the connection (frames before that are read past)."""
    while True:
        try:
            frame = await raw.next()
        except ConnectionResetError:
            return True
        if frame is None:
            return True


async def test_call_started_runs_before_the_call_and_is_released_when_it_ends(
    served: Any,
) -> None:
    _, app, port = served
    client = await Client.open(port)
    assert (await client.call("/echo", b"a"))["data"] == b"a"
    assert app.ran_after == [True] and app.tokens[0].released == 1  # the server released it
    sid = client.send("/hang", b"x")
    await app.until(lambda: app.started == 1, "app.started == 1")
    client.conn.reset_stream(sid)
    client.flush()
    await app.until(lambda: app.cancelled == 1, "app.cancelled == 1")
    await app.until(lambda: app.tokens[1].released == 1, "the cancelled call's token released")
    # headers and a reset in one write: the task may be cancelled before it ever runs
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                   (b":path", b"/hang"), (b":authority", b"t")])  # fmt: skip
    client.conn.reset_stream(sid)
    client.writer.write(client.conn.data_to_send())
    await app.until(lambda: len(app.tokens) == 3, "call_started for the third call")
    await app.until(lambda: app.tokens[2].released == 1, "the never-run call's token released")
    assert (await client.call("/quiet", b"q"))["data"] == b"q"  # None: nothing in the scope
    assert app.ran_after[-1] is False and len(app.tokens) == 3
    await client.close()
