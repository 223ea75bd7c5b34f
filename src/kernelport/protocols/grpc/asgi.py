"""The gRPC front end as an ASGI application, for an HTTP/2 server outside Python.

grpcio's Python server costs ~270 us of the core per call before any work is done
(bench/RESULTS.md); an HTTP/2 server written in native code that hands complete request
bodies to an ASGI application with trailer support (Envoy through pyvoy, see
``kernelport.hosting``) costs about a quarter of that. This module is the part in Python:
route by ``:path``, frame and deframe messages, honour ``grpc-timeout`` and
``grpc-encoding``, check API keys, and answer with ``grpc-status`` in the trailers. The
servicers are the ones the grpcio front end serves, so both transports behave alike.

Cancellation: a client that goes away while its request waits has the request's work
dropped, as with grpcio. A server that completes a pending ``receive()`` only on disconnect
(the ASGI norm) is watched with one waiting call; one that answers every ``receive()`` after
the body at once (pyvoy) is asked again while the request runs, the gaps doubling from
``POLL_S`` up to ``POLL_MAX_S``. Most calls end within a few milliseconds, so a call is first
watched only once it has run for between ``POLL_S`` and twice that: one timer for all the
calls of a loop (``_Watches``) finds the ones still running, where a timer per call cost ~4
us of every call.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from kernelport.core.fill import Announcement
from kernelport.protocols.auth import UNAUTHENTICATED_MESSAGE, Auth
from kernelport.protocols.grpc import rpc, wire
from kernelport.protocols.grpc.announce import MODEL_INFER, ConnectionModels
from kernelport.protocols.grpc.errors import Abort, Disconnected, status_of, trailers
from kernelport.protocols.grpc.http2 import EARLY
from kernelport.protocols.grpc.streams import Receive, Send, serve_stream
from kernelport.protocols.inflate import OFF_LOOP_BYTES
from kernelport.schema.pb import POOL

log = logging.getLogger("kernelport.grpc")

Scope = dict[str, Any]

POLL_S = 0.05  # how often a running request asks whether its client is still there
#: the longest gap between two asks: a call's gaps double from POLL_S up to this, so a long
#: call (a large batch, a slow model) costs a few asks, not twenty a second
POLL_MAX_S = 8 * POLL_S
_INLINE_FRAME = 64 * 1024  # above this a response's frame header is sent on its own (no join)
# Headers that are the transport's, not the call's metadata.
_NOT_METADATA = frozenset(
    {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"}
)
_START_HEADERS = [(b"content-type", b"application/grpc")]
_OK_TRAILERS = [(b"grpc-status", b"0")]


class CallContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers use."""

    __slots__ = ("_headers", "_metadata", "trailing", "written")

    def __init__(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self._headers = headers
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None
        self.trailing: tuple[tuple[str, str], ...] = ()
        # A server-streaming handler that writes (``await context.write(m)``) rather than
        # yields, as grpc.health.v1's Watch does: its messages, for the stream to send.
        self.written: asyncio.Queue[Any] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        if self._metadata is None:  # built only when a handler asks
            items: list[tuple[str, str | bytes]] = []
            for key, value in self._headers:
                if key in _NOT_METADATA or key.startswith(b":"):
                    continue
                name = key.decode("latin-1")
                if name.endswith("-bin"):
                    items.append((name, base64.b64decode(value + b"==")))
                else:
                    items.append((name, value.decode("latin-1")))
            self._metadata = tuple(items)
        return self._metadata

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        self.trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Abort(code, details)

    async def write(self, message: Any) -> None:
        if self.written is None:
            raise RuntimeError("context.write() outside a server-streaming call")
        await self.written.put(message)


class Route:
    __slots__ = ("announced", "guarded", "handler", "method", "name", "parse", "serialized")

    def __init__(self, name: str, handler: Any, method: rpc.Method, guarded: bool) -> None:
        self.name, self.handler, self.method, self.guarded = name, handler, method, guarded
        self.announced = False  # calls are announced to their model while being received
        self.serialized = False  # the handler answers the response message's bytes
        #: request bytes -> the message the handler takes
        self.parse: Callable[[Any], Any] = method.request.FromString


class GrpcAsgiApp:
    """Serves the servicers' RPCs (``{service: servicer}``) to an HTTP/2 ASGI server.

    ``handlers``: more services as ``{service: {rpc: behaviour}}``, with their descriptors
    in ``pool`` (the standard health and reflection services, in protobuf's default pool).
    ``models``: announces ModelInfer calls while they are received (``announce.py``).
    A servicer's ``serialized()``, if it has one, gives unary RPCs a behaviour that answers
    the serialized response (``{rpc: behaviour}``), used in place of the message one; its
    ``parsers()``, if it has one, parses requests of the RPCs it names (``{rpc: parse}``).
    ``watch``: False for a server that cancels a call's task itself when its client goes
    away (``http2.py``), so calls need no watch of their own.
    """

    def __init__(
        self,
        servicers: dict[str, object],
        max_message_bytes: int,
        auth: Auth,
        handlers: Mapping[str, Mapping[str, Any]] | None = None,
        pool: descriptor_pool.DescriptorPool = POOL,
        models: ConnectionModels | None = None,
        watch: bool = True,
    ) -> None:
        self.limit = max_message_bytes
        self._watching = watch
        self._auth = auth
        self._models = models
        self._routes: dict[str, Route] = {}
        services: list[tuple[str, Mapping[str, Any], descriptor_pool.DescriptorPool]] = [
            (service, _behaviours(servicer), POOL) for service, servicer in servicers.items()
        ]
        services += [(service, impl, pool) for service, impl in (handlers or {}).items()]
        for service, impl, where in services:
            for name, method in rpc.methods(service, where).items():
                handler = impl.get(name)
                if handler is not None:  # the rest answer UNIMPLEMENTED, as grpcio does
                    guarded = auth.enabled and auth.protects_rpc(name)
                    self._routes[f"/{service}/{name}"] = Route(name, handler, method, guarded)
        for service, servicer in servicers.items():
            faster = getattr(servicer, "serialized", None)
            for name, handler in (faster() if faster is not None else {}).items():
                route = self._routes.get(f"/{service}/{name}")
                if route is not None:
                    route.handler, route.serialized = handler, True
            parsers = getattr(servicer, "parsers", None)
            for name, parse in (parsers() if parsers is not None else {}).items():
                route = self._routes.get(f"/{service}/{name}")
                if route is not None:
                    route.parse = parse
        self._announcing = False  # ModelInfer calls are announced (call_started)
        if models is not None and (infer := self._routes.get(MODEL_INFER)) is not None:
            infer.announced = self._announcing = True
        self._watches: dict[asyncio.AbstractEventLoop, _Watches] = {}

    def call_started(self, scope: Scope) -> Announcement | None:
        """A call's headers have arrived (a transport calls this before the call's task first
        runs): a ModelInfer call is announced to its connection's last model from now on, so
        a batch cut made before its task runs waits for it. ``__call__`` takes it over from
        ``scope[EARLY]``; the transport releases it again when the call ends (idempotent)."""
        models = self._models
        if models is None or scope["path"] != MODEL_INFER or not self._announcing:
            return None
        return models.begin(scope.get("client"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        content_type = timeout = encoding = authorization = None
        headers = scope["headers"]
        for key, value in headers:
            if key == b"content-type":
                content_type = value
            elif key == b"grpc-timeout":
                timeout = value
            elif key == b"grpc-encoding":
                encoding = value
            elif key == b"authorization":
                authorization = value
        if scope["method"] != "POST" or not (content_type or b"").startswith(b"application/grpc"):
            # Not gRPC at all: the protocol says 415, in plain HTTP.
            await send({"type": "http.response.start", "status": 415, "headers": []})
            await send({"type": "http.response.body", "body": b"gRPC requests only\n"})
            return
        context = CallContext(headers)
        try:
            route = self._routes.get(scope["path"])
            if route is None:
                raise Abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            if encoding is not None and encoding not in wire.ENCODINGS:
                raise Abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"message encoding {encoding[:32].decode('latin-1')!r} is not supported",
                )
            if route.guarded and not self._auth.allows(authorization):
                raise Abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            deadline = None
            if timeout is not None:
                try:
                    deadline = asyncio.get_running_loop().time() + wire.parse_timeout(timeout)
                except ValueError as exc:
                    raise Abort(grpc.StatusCode.INTERNAL, str(exc)) from None
            if route.method.client_streaming or route.method.server_streaming:
                await serve_stream(self, route, context, deadline, encoding, receive, send)
            else:
                connection = scope.get("client") if route.announced else None
                early = scope.get(EARLY)
                await self._unary(
                    route, context, deadline, encoding, receive, send, connection, early
                )
        except Disconnected:
            pass
        except Exception as exc:
            code, message = status_of(exc, scope["path"])
            await _finish_error(send, code, message, context.trailing)

    async def _unary(
        self, route: Route, context: CallContext, deadline: float | None,
        encoding: bytes | None, receive: Receive, send: Send, connection: Any = None,
        early: Announcement | None = None,
    ) -> None:  # fmt: skip
        models = self._models if route.announced else None
        if models is None:
            request = await self.read_one(route, encoding, receive)
        else:
            announced = early if early is not None else models.begin(connection)
            try:
                request = await self.read_one(route, encoding, receive)
            finally:
                # Parsed (or failed): the handler decodes and queues it without yielding.
                if announced is not None:
                    announced.release()
            models.parsed(connection, request)
        task = asyncio.current_task()
        assert task is not None
        watch = self.watch(task, receive)
        try:
            if deadline is None:  # most calls: no timeout machinery at all
                response = await route.handler(request, context)
            else:
                async with asyncio.timeout_at(deadline):
                    response = await route.handler(request, context)
        except asyncio.CancelledError:
            if watch is not None and watch.gone and task.uncancel() == 0:
                raise Disconnected from None
            raise
        except TimeoutError:
            raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        finally:
            if watch is not None:
                watch.stop()
        if route.serialized:
            payload = response
        else:
            payload = route.method.response.SerializeToString(response)
        if len(payload) > self.limit:
            raise wire.too_large("Sent", len(payload), self.limit)
        await send({"type": "http.response.start", "status": 200, "headers": _START_HEADERS,
                    "trailers": True})  # fmt: skip
        # The last body message ends the body: servers need not confirm it (pyvoy returns
        # at once, where a message with more_body waits for Envoy), so the answer is sent
        # in as few messages as possible.
        if len(payload) <= _INLINE_FRAME:
            await send({"type": "http.response.body",
                        "body": wire.frame_header(len(payload)) + payload})  # fmt: skip
        else:  # no join of a large payload
            await send({"type": "http.response.body", "body": wire.frame_header(len(payload)),
                        "more_body": True})  # fmt: skip
            await send({"type": "http.response.body", "body": payload})
        await send({"type": "http.response.trailers", "headers": _OK_TRAILERS})

    def watch(self, task: asyncio.Task[Any], receive: Receive) -> _Watch | None:
        if not self._watching:
            return None
        loop = task.get_loop()
        watches = self._watches.get(loop)
        if watches is None:
            self._watches = {k: v for k, v in self._watches.items() if not k.is_closed()}
            watches = self._watches[loop] = _Watches(loop)
        return watches.add(task, receive)

    async def read_one(self, route: Route, encoding: bytes | None, receive: Receive) -> Any:
        """The request message of a call whose client sends one (unary, server streaming)."""
        event = await receive()
        if event["type"] == "http.disconnect":
            raise Disconnected
        body = event.get("body", b"")
        size = len(body) - wire.HEADER_BYTES
        if (
            not event.get("more_body")
            and 0 <= size <= self.limit
            and body[0] == 0
            and int.from_bytes(body[1 : wire.HEADER_BYTES], "big") == size
        ):  # most calls: one uncompressed message in one piece
            return route.parse(memoryview(body)[wire.HEADER_BYTES :])
        deframer = wire.Deframer(self.limit)
        messages: list[tuple[bool, bytes | memoryview]] = []
        while True:
            if body:
                messages += deframer.feed(body)
            if not event.get("more_body"):
                break
            event = await receive()
            if event["type"] == "http.disconnect":
                raise Disconnected
            body = event.get("body", b"")
        if len(messages) != 1 or deframer.pending:
            raise Abort(
                grpc.StatusCode.INTERNAL,
                f"a unary call takes one request message, got {len(messages)}"
                + (" and part of another" if deframer.pending else ""),
            )
        compressed, data = messages[0]
        if compressed:
            data = await self.inflate(data, encoding)
        return route.parse(data)

    async def inflate(self, data: bytes | memoryview, encoding: bytes | None) -> bytes:
        if encoding is None or encoding == b"identity":
            raise Abort(grpc.StatusCode.INTERNAL, "a compressed message without grpc-encoding")
        if len(data) <= OFF_LOOP_BYTES:
            return wire.inflate(data, encoding, self.limit)
        return await asyncio.to_thread(wire.inflate, data, encoding, self.limit)


def _behaviours(servicer: object) -> dict[str, Any]:
    return {name: getattr(servicer, name) for name in dir(servicer) if name[:1].isupper()}


class _Watches:
    """The calls of one event loop whose clients are to be watched once they run long.

    One timer ticks every ``POLL_S`` while any call runs; a call still running at the second
    tick after it began (after between ``POLL_S`` and twice that) starts its own ``_Watch``.
    """

    __slots__ = ("_calls", "_handle", "_loop", "_tick")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: dict[_Watch, int] = {}  # in the order added: the tick each was added at
        self._handle: asyncio.TimerHandle | None = None
        self._tick = 0

    def add(self, task: asyncio.Task[Any], receive: Receive) -> _Watch:
        watch = _Watch(task, receive, self._calls)
        self._calls[watch] = self._tick
        if self._handle is None:
            self._handle = self._loop.call_later(POLL_S, self._on_tick)
        return watch

    def _on_tick(self) -> None:
        self._tick += 1
        due = self._tick - 2
        calls = self._calls
        started = []
        for watch, tick in calls.items():
            if tick > due:
                break
            started.append(watch)
        for watch in started:
            del calls[watch]
            watch.start()
        self._handle = self._loop.call_later(POLL_S, self._on_tick) if calls else None


class _Watch:
    """Cancels ``task`` if its client disconnects while it runs (see the module docstring)."""

    __slots__ = (
        "_asking", "_calls", "_handle", "_receive", "_stopped", "_task", "gone", "interval",
    )  # fmt: skip

    def __init__(self, task: asyncio.Task[Any], receive: Receive, calls: dict[_Watch, int]) -> None:
        self._task, self._receive, self._calls = task, receive, calls
        self.gone = self._stopped = False
        self._asking: asyncio.Future[None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.interval = POLL_S  # until the next ask; doubles up to POLL_MAX_S

    def start(self) -> None:
        self._handle = None
        self._asking = asyncio.ensure_future(self._ask())

    async def _ask(self) -> None:
        # Never cancelled: the server completes the receive() it handed out, and cancelling
        # its future under it makes pyvoy report an invalid state.
        event = await self._receive()
        if self._stopped:
            return
        if event["type"] == "http.disconnect":
            self.gone = True
            self._task.cancel()
        else:  # answered at once: still there; ask again later, and later each time
            self.interval = min(self.interval * 2, POLL_MAX_S)
            self._handle = asyncio.get_running_loop().call_later(self.interval, self.start)

    def stop(self) -> None:
        self._stopped = True
        self._calls.pop(self, None)
        if self._handle is not None:
            self._handle.cancel()


async def _finish_error(
    send: Send, code: grpc.StatusCode, message: str, metadata: Iterable[tuple[str, str]]
) -> None:
    """A Trailers-Only response: the status in the headers, no body."""
    headers = [*_START_HEADERS, *trailers(code, message, metadata)]
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
    except Exception:  # the client is gone, or the response had already started
        log.debug("could not send gRPC status %s", code.name)
