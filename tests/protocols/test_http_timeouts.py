"""The deadlines of KernelPort's uvicorn protocol (``protocols/http_timeouts.py``) over real
sockets: stalled headers and idle keep-alive connections are closed no sooner than their
timeout, answered requests are not, and the one sweep per loop stops with its connections."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rest_client import listen

from kernelport.protocols import http_timeouts
from kernelport.protocols.http_timeouts import MAX_HEAD_BYTES, header_timeout_protocol


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(header_timeout: float, keep_alive: float) -> tuple[asyncio.Server, int]:
    protocol = header_timeout_protocol(header_timeout)
    return await listen(ok, protocol, timeout_keep_alive=keep_alive)


async def _until_closed(reader: asyncio.StreamReader) -> float:
    started = time.monotonic()
    while await asyncio.wait_for(reader.read(4096), 30):
        pass
    return time.monotonic() - started


async def test_stalled_headers_are_closed_after_the_header_timeout() -> None:
    server, port = await _serve(header_timeout=0.3, keep_alive=30)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHo")
        assert await _until_closed(reader) >= 0.25  # never before the deadline (less a tick)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_head_over_the_limit_is_answered_431_and_closed() -> None:
    server, port = await _serve(header_timeout=30, keep_alive=30)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Past the limit only with the last header: the server has read every byte when it
        # closes (unread bytes would make the close a reset, which can lose the answer).
        filler = b"x-filler: " + b"a" * 1000 + b"\r\n"
        writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n")
        for _ in range((MAX_HEAD_BYTES - 2000) // 1008):
            writer.write(filler)
        writer.write(b"x-last: " + b"a" * 3000 + b"\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head
        assert str(MAX_HEAD_BYTES).encode() in await reader.read()  # the message, then closed
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")  # others are still served
        assert (await reader.readuntil(b"\r\n\r\nok")).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() -> None:
    server, port = await _serve(header_timeout=30, keep_alive=1.0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # A request every ~0.1 s for 1.5 s: longer than the keep-alive timeout, never idle.
        for _ in range(15):
            writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\nok")
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.1)  # the gap between requests is what the test is about
        assert await _until_closed(reader) >= 0.9  # then idle: closed after the timeout
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_the_sweep_stops_when_its_loop_has_no_connections() -> None:
    server, port = await _serve(header_timeout=0.2, keep_alive=0.2)
    try:
        readers = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            readers.append((reader, writer))
        sweep = http_timeouts._sweeps[asyncio.get_running_loop()]
        assert len(sweep.connections) == 3 and sweep.period <= 0.05
        for reader, writer in readers:  # nothing sent: each closed by its header deadline
            await _until_closed(reader)
            writer.close()
        for _ in range(1000):
            if not sweep.connections and sweep._timer is None:
                break
            await asyncio.sleep(0.01)
        assert not sweep.connections and sweep._timer is None
    finally:
        server.close()
        await server.wait_closed()
