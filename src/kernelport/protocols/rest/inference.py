"""The V2 REST inference route's work per request (compiled by mypyc: ``native.py``).

``RestApp`` (the ASGI application, interpreted: it answers every other route, most of them
rarely) and ``DirectProtocol`` (the HTTP/1.1 parser's plain inference requests) both hand an
inference to :class:`RestInference`: decode the body, run it through the DataPlane, encode the
answer, with the request's id and trace, and cancel it if the client hangs up. The route's
matching (:func:`infer_target`, :func:`plain_request`) is here for the same reason: every
request passes through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from kernelport.core.dataplane import DataPlane
from kernelport.core.fill import Announcement
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.limits import Limits
from kernelport.observability.telemetry import Telemetry, header_value
from kernelport.protocols.rest import codec
from kernelport.protocols.rest.bodies import accepted_encoding, ascii_number, compress
from kernelport.protocols.rest.errors import HTTP_STATUS

log = logging.getLogger("kernelport.http")

Headers = list[tuple[bytes, bytes]]
RawHeaders = Mapping[bytes, bytes]  # as the ASGI scope gives them: lower-case names
Watch = Callable[[Callable[[], None] | None], None]

_HEADER_LENGTH = codec.HEADER_LENGTH.encode()
_INFER_PREFIX, _INFER_SUFFIX = "/v2/models/", "/infer"
_JSON = [(b"content-type", b"application/json")]
_OCTETS = (b"content-type", b"application/octet-stream")


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj), list(_JSON))


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def infer_target(path: str) -> tuple[str, str] | None:
    """(model, version) when ``path`` is /v2/models/{model}[/versions/{version}]/infer, as
    the route table would match it; None sends every other shape through the table."""
    if not (path.startswith(_INFER_PREFIX) and path.endswith(_INFER_SUFFIX)):
        return None
    parts = path[len(_INFER_PREFIX) : -len(_INFER_SUFFIX)].split("/")
    if len(parts) == 1:
        return (parts[0], "") if parts[0] else None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


def plain_target(path: bytes) -> tuple[str, str] | None:
    """(model, version) if ``path`` is an infer route with no percent-escapes."""
    if b"%" in path or not path.isascii():
        return None
    return infer_target(path.decode("ascii"))


def plain_length(headers: RawHeaders, max_request_bytes: int) -> int | None:
    """The body's length if it is a Content-Length within ``max_request_bytes`` and the body
    has no Content-Encoding or Transfer-Encoding."""
    if b"content-encoding" in headers or b"transfer-encoding" in headers:
        return None
    length = ascii_number(headers.get(b"content-length", b"").decode("latin-1"))
    if length is None or length > max_request_bytes:
        return None  # the ASGI path answers 413 or reads a body without a length
    return length


def plain_request(
    path: bytes, raw_headers: list[tuple[bytes, bytes]], max_request_bytes: int
) -> tuple[tuple[str, str], dict[bytes, bytes]] | None:
    """The target and headers of a POST whose URL path is ``path``, if it is a plain
    inference (``direct.py``): :func:`plain_target` and :func:`plain_length` hold."""
    target = plain_target(path)
    if target is None:
        return None
    headers = dict(raw_headers)  # lower-case names; the last of a repeated one wins
    if plain_length(headers, max_request_bytes) is None:
        return None
    return target, headers


class RestInference:
    """POST /v2/models/{model}[/versions/{version}]/infer on one DataPlane."""

    def __init__(self, dataplane: DataPlane, telemetry: Telemetry, limits: Limits) -> None:
        self._dp = dataplane
        self._telemetry = telemetry
        self._limits = limits

    @property
    def max_request_bytes(self) -> int:
        return self._limits.max_request_bytes

    def announce(self, model: str, version: str) -> Announcement | None:
        """Count a coming request in its model's queue (``DataPlane.announce``)."""
        return self._dp.announce(model, version)

    async def response(
        self,
        model: str,
        version: str,
        headers: RawHeaders,
        body: bytes,
        announced: Announcement | None,
        watch: Watch,
    ) -> Response:
        """The response to an inference whose body is read and not compressed: what the
        ASGI path answers, for a server that serves the route without the ASGI cycle
        (``protocols/rest/direct.py``). Releases ``announced`` whatever happens."""
        try:
            return await until_hung_up(self.infer(model, version, headers, body, announced), watch)
        except ServerError as exc:  # the client left
            return error_response(HTTP_STATUS[exc.code], exc.message)
        finally:
            if announced is not None:
                announced.release()

    async def infer(
        self,
        model: str,
        version: str,
        headers: RawHeaders,
        body: bytes,
        announced: Announcement | None = None,
    ) -> Response:
        context = self._telemetry.request(
            "http", model, version, where="inference", log=log, traced=True,
            header_id=lambda: headers.get(b"x-request-id", b"").decode("latin-1"),
        )  # fmt: skip
        trace = context.trace
        if trace is not None:
            # a client's W3C traceparent becomes the parent span
            trace.carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        dp = self._dp
        try:
            header_length = None
            if (raw := headers.get(_HEADER_LENGTH)) is not None:
                raw_length = raw.decode("latin-1")
                header_length = ascii_number(raw_length)
                if header_length is None:
                    raise invalid(f"Inference-Header-Content-Length '{raw_length}' is not a number")
            request = codec.decode_request(
                body, header_length, model, version, self._limits, dp.shared_memory
            )
            # The body's id wins; the response body echoes only that one (Triton's semantics).
            context.identify(request.id)
            if trace is not None:
                trace.decoded()
            if announced is not None:
                announced.release()  # infer() queues it before it yields: in flight there
            response = await dp.infer(request)
            if trace is not None:
                trace.inferred(response)
            payload, json_length = codec.encode_response(request, response)
        except Exception as exc:
            error = context.failed(exc)
            failed = error_response(HTTP_STATUS[error.code], error.message)
            failed.headers.append((b"x-request-id", header_value(context.request_id)))
            return failed
        out_headers: Headers
        if json_length is None:
            out_headers = list(_JSON)
        else:
            out_headers = [_OCTETS, (b"inference-header-content-length", b"%d" % json_length)]
        out_headers.append((b"x-request-id", header_value(context.request_id)))
        accept = headers.get(b"accept-encoding")
        if accept:
            encoding = accepted_encoding(accept.decode("latin-1"))
            if encoding:
                payload = await compress(payload, encoding)
                out_headers.append((b"content-encoding", encoding.encode()))
        context.succeeded(response)
        return Response(200, payload, out_headers)


class _HangUp:
    """Cancels the task it was made in when its client leaves, until the task is answered."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.gone = False
        self.finished = False

    def __call__(self) -> None:
        if not self.finished and not self.gone:
            self.gone = True
            self.task.cancel()


async def until_hung_up(work: Awaitable[Response], watch: Watch) -> Response:
    """Run ``work``; ``watch(hang_up)`` cancels it if the client leaves first (400, "client
    disconnected"), ``watch(None)`` stops watching once it is answered."""
    current = asyncio.current_task()
    assert current is not None
    hang_up = _HangUp(current)
    watch(hang_up)
    try:
        return await work
    except asyncio.CancelledError:
        if hang_up.gone:
            current.uncancel()
            raise ServerError(ErrorCode.CANCELLED, "client disconnected") from None
        raise
    finally:
        hang_up.finished = True
        watch(None)
