"""The gRPC calls whose client or server streams messages, for ``GrpcAsgiApp`` (``asgi.py``).

Kept apart from the unary path because it is built on async generators, which mypyc does not
compile: the unary path (``asgi.py``) is compiled with the rest of the request path
(``kernelport/native.py``), this stays Python.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc

from kernelport.protocols.grpc import wire
from kernelport.protocols.grpc.errors import Abort, Disconnected, status_of, trailers

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Watching(Protocol):
    """What ``GrpcAsgiApp.watch`` hands back: whether the client went away, and a stop."""

    gone: bool

    def stop(self) -> None: ...


class App(Protocol):
    """The parts of ``GrpcAsgiApp`` a streaming call uses (``asgi.py`` imports this module,
    so it is described here rather than imported)."""

    limit: int

    async def read_one(self, route: Any, encoding: bytes | None, receive: Receive) -> Any: ...

    def watch(self, task: asyncio.Task[Any], receive: Receive) -> Watching | None: ...

    async def inflate(self, data: bytes | memoryview, encoding: bytes | None) -> bytes: ...


_START_HEADERS = [(b"content-type", b"application/grpc")]
_OK_TRAILERS = [(b"grpc-status", b"0")]


async def serve_stream(
    app: App, route: Any, context: Any, deadline: float | None,
    encoding: bytes | None, receive: Receive, send: Send,
) -> None:  # fmt: skip
    task = asyncio.current_task()
    assert task is not None
    gone = False
    watch: Watching | None = None

    async def requests() -> AsyncIterator[Any]:
        nonlocal gone, watch
        deframer = wire.Deframer(app.limit)
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                gone = True
                task.cancel()  # the handler's queued work is dropped with it
                return
            for compressed, data in deframer.feed(event.get("body", b"")):
                if compressed:
                    data = await app.inflate(data, encoding)
                yield route.parse(data)
            if not event.get("more_body"):
                if deframer.pending:
                    raise Abort(grpc.StatusCode.INTERNAL, "the stream ended inside a message")
                # Half-closed: nothing more to read, so watch the client as a unary call does.
                watch = app.watch(task, receive)
                return

    if route.method.client_streaming:
        call = route.handler(requests(), context)
    else:  # server streaming: one request, read before the response starts
        call = route.handler(await app.read_one(route, encoding, receive), context)
        watch = app.watch(task, receive)
    responses = call if hasattr(call, "__anext__") else _written(call, context)
    await send({"type": "http.response.start", "status": 200, "headers": _START_HEADERS,
                "trailers": True})  # fmt: skip
    serialize = route.method.response.SerializeToString
    try:
        async with asyncio.timeout_at(deadline):
            async for response in responses:
                payload = serialize(response)
                if len(payload) > app.limit:
                    raise wire.too_large("Sent", len(payload), app.limit)
                await send({"type": "http.response.body", "more_body": True,
                            "body": wire.frame_header(len(payload)) + payload})  # fmt: skip
    except asyncio.CancelledError:
        if (gone or (watch is not None and watch.gone)) and task.uncancel() == 0:
            raise Disconnected from None
        raise
    except Exception as exc:
        # The response has started: a passed deadline, like any error, goes in the trailers.
        if isinstance(exc, TimeoutError):
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        else:
            code, message = status_of(exc, route.name)
        await send({"type": "http.response.body", "body": b""})
        await send({"type": "http.response.trailers",
                    "headers": trailers(code, message, context.trailing)})  # fmt: skip
        return
    finally:
        if watch is not None:
            watch.stop()
        await responses.aclose()
    await send({"type": "http.response.body", "body": b""})
    await send({"type": "http.response.trailers", "headers": _OK_TRAILERS})


async def _written(call: Awaitable[None], context: Any) -> AsyncGenerator[Any, None]:
    """The messages a handler writes with ``context.write``, until it returns."""
    written: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)  # a write waits for the last send
    context.written = written
    task = asyncio.ensure_future(call)
    try:
        while True:
            get = asyncio.ensure_future(written.get())
            await asyncio.wait((get, task), return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                yield get.result()
                continue
            get.cancel()
            while not written.empty():
                yield written.get_nowait()
            await task  # its result, or its error for the trailers
            return
    finally:
        task.cancel()
