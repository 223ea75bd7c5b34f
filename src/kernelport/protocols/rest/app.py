"""A bare ASGI application for the V2 REST API (no framework: routing is a few regexes)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import logging
import re
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import orjson

from kernelport.core.dataplane import DataPlane
from kernelport.core.model_config import triton_config
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.limits import Limits
from kernelport.observability.telemetry import Telemetry, header_value
from kernelport.protocols.rest import codec
from kernelport.protocols.rest.errors import HTTP_STATUS
from kernelport.protocols.rest.stats import statistics_json

log = logging.getLogger("kernelport.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_JSON = [(b"content-type", b"application/json")]
_MODEL = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"(?:/(?P<verb>infer|ready|config|stats|trace/setting))?$"
)
_REPO = re.compile(
    r"^/v2/repository(?:/(?P<repo>[^/]+))?/(?:index|models/(?P<model>[^/]+)/(?P<verb>load|unload))$"
)
_SHM = re.compile(
    r"^/v2/(?P<kind>system|cuda)sharedmemory(?:/region/(?P<region>[^/]+))?/(?P<verb>status|register|unregister)$"
)


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


# Bodies and responses above this are (de)compressed on a thread, not on the event loop.
_OFF_LOOP_BYTES = 64 * 1024


def _too_large(what: str, limit: int, flag: str) -> ServerError:
    return ServerError(
        ErrorCode.TOO_LARGE, f"{what} is larger than the limit of {limit} bytes ({flag})"
    )


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo gzip/deflate, stopping as soon as the output passes ``limit`` bytes.

    Streaming with ``max_length`` bounds memory by the limit, whatever the ratio: a few KiB
    of zeros can otherwise inflate to gigabytes before anything checks the size.
    """
    if encoding not in ("gzip", "deflate"):
        raise ServerError(ErrorCode.UNSUPPORTED, f"unsupported Content-Encoding '{encoding}'")
    # gzip: a gzip header; deflate: a zlib header (HTTP's "deflate" is zlib-wrapped).
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise _too_large("request body once decompressed", limit, "--max-inflated-bytes")
        if not inflater.eof:
            raise invalid(f"request body is not valid {encoding} data: truncated stream")
    except zlib.error as exc:
        raise invalid(f"request body is not valid {encoding} data: {exc}") from None
    return out


async def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if len(body) <= _OFF_LOOP_BYTES:
        return _inflate(body, encoding, limit)
    return await asyncio.to_thread(_inflate, body, encoding, limit)


def _deflate(payload: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(payload, compresslevel=1)
    return zlib.compress(payload, 1)


async def _compress(payload: bytes, encoding: str) -> bytes:
    if len(payload) <= _OFF_LOOP_BYTES:
        return _deflate(payload, encoding)
    return await asyncio.to_thread(_deflate, payload, encoding)


def _ascii_number(text: str) -> int | None:
    """``text`` as a non-negative integer if it is ASCII digits (str.isdigit() also accepts
    digits int() refuses, e.g. superscripts), else None."""
    stripped = text.strip()
    return int(stripped) if stripped.isascii() and stripped.isdigit() else None


def _accepted_encoding(header: str) -> str | None:
    """The response encoding the client prefers among gzip and deflate (honouring q=0)."""
    best, best_q = None, 0.0
    for part in header.split(","):
        token, _, params = part.strip().partition(";")
        token = token.strip().lower()
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if token in ("gzip", "deflate") and q > best_q:
            best, best_q = token, q
    return best


class RestApp:
    """ASGI callable: ``await app(scope, receive, send)``."""

    def __init__(
        self,
        dataplane: DataPlane,
        telemetry: Telemetry | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._dp = dataplane
        self._telemetry = telemetry if telemetry is not None else Telemetry()
        self._limits = limits if limits is not None else dataplane.limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await _read_body(receive, headers, self._limits.max_request_bytes)
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if body and encoding not in ("", "identity"):
                body = await _decompress(body, encoding, self._limits.max_inflated_bytes)
            route = self._route(scope["method"], scope["path"], headers, body)
            if scope["path"].endswith("/infer"):
                response = await _unless_disconnected(route, receive)
            else:
                response = await route
        except ServerError as exc:
            response = error_response(HTTP_STATUS[exc.code], exc.message)
            if exc.code is ErrorCode.UNSUPPORTED and "Content-Encoding" in exc.message:
                response.headers.append((b"accept-encoding", b"gzip, deflate"))
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal server error")
        response.headers.append((b"content-length", str(len(response.body)).encode()))
        await send(
            {"type": "http.response.start", "status": response.status, "headers": response.headers}
        )
        await send({"type": "http.response.body", "body": response.body})

    async def _route(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Response:
        dp = self._dp
        if path.endswith("/") and len(path) > 1:
            path = path.rstrip("/")
        if path == "/v2/health/live":
            return _only(method, "GET") or Response(200 if dp.live() else 400)
        if path == "/v2/health/ready":
            return _only(method, "GET") or Response(200 if dp.ready() else 400)
        if path == "/v2":
            return _only(method, "GET") or json_response(asdict(dp.server_metadata()))
        if path == "/v2/trace/setting":
            return self._trace_setting(method, "", body)
        if path == "/v2/logging":
            if method == "POST":
                return json_response(self._telemetry.logs.update(_settings_object(body)))
            return _only(method, "GET") or json_response(self._telemetry.logs.get())
        if path == "/v2/models/stats":
            return _only(method, "GET") or json_response(statistics_json(dp.model_statistics()))
        match = _MODEL.match(path)
        if match:
            return await self._model(
                method, match["model"], match["version"] or "", match["verb"], headers, body
            )
        match = _REPO.match(path)
        if match and match["repo"] and match["verb"]:
            return error_response(501, "load and unload in a named repository are not supported")
        if match:
            return _only(method, "POST") or await self._repository(
                match["model"], match["verb"], body
            )
        match = _SHM.match(path)
        if match:
            return _shared_memory(match["verb"], match["region"])
        return error_response(404, "Not Found")

    async def _model(
        self,
        method: str,
        model: str,
        version: str,
        verb: str | None,
        headers: dict[str, str],
        body: bytes,
    ) -> Response:
        dp = self._dp
        if verb == "infer":
            return _only(method, "POST") or await self._infer(model, version, headers, body)
        if verb == "trace/setting":
            if version:
                return error_response(400, "trace settings are per model, not per version")
            dp.model_config(model)  # NOT_FOUND for an unknown model
            return self._trace_setting(method, model, body)
        bad_method = _only(method, "GET")
        if bad_method:
            return bad_method
        if verb is None:
            meta = dp.model_metadata(model, version)
            return json_response(asdict(meta))
        if verb == "ready":
            if dp.model_ready(model, version):
                return Response(200)
            return error_response(
                400, f"model '{model}' version '{version or 'default'}' is not ready"
            )
        if verb == "config":
            return json_response(triton_config(dp.model_config(model, version)))
        return json_response(statistics_json(dp.model_statistics(model, version)))

    async def _infer(
        self, model: str, version: str, headers: dict[str, str], body: bytes
    ) -> Response:
        context = self._telemetry.request(
            "http", model, version, where="inference", log=log, traced=True,
            header_id=lambda: headers.get("x-request-id", ""),
        )  # fmt: skip
        trace = context.trace
        if trace is not None:
            trace.carrier = headers  # a client's W3C traceparent becomes the parent span
        try:
            raw_length = headers.get(codec.HEADER_LENGTH)
            header_length = None
            if raw_length is not None:
                header_length = _ascii_number(raw_length)
                if header_length is None:
                    raise invalid(f"Inference-Header-Content-Length '{raw_length}' is not a number")
            request = codec.decode_request(body, header_length, model, version, self._limits)
            # The body's id wins; the response body echoes only that one (Triton's semantics).
            context.identify(request.id)
            if trace is not None:
                trace.decoded()
            response = await self._dp.infer(request)
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
            out_headers = [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(json_length).encode()),
            ]
        out_headers.append((b"x-request-id", header_value(context.request_id)))
        accept = headers.get("accept-encoding")
        if accept:
            encoding = _accepted_encoding(accept)
            if encoding:
                payload = await _compress(payload, encoding)
                out_headers.append((b"content-encoding", encoding.encode()))
        context.succeeded(response)
        return Response(200, payload, out_headers)

    def _trace_setting(self, method: str, model: str, body: bytes) -> Response:
        tracing = self._telemetry.tracing
        if method == "POST":
            return json_response(tracing.update(_settings_object(body), model))
        return _only(method, "GET") or json_response(tracing.settings(model))

    async def _repository(self, model: str | None, verb: str | None, body: bytes) -> Response:
        dp = self._dp
        params: dict[str, Any] = {}
        obj: Any = {}
        if body.strip():
            obj = codec._parse_json(body, "request body")
            if not isinstance(obj, dict):
                raise invalid("request body must be a JSON object")
        if model is None:
            ready = obj.get("ready", False)
            if not isinstance(ready, bool):
                raise invalid("'ready' must be a boolean")
            entries = await dp.repository_index(ready)
            return json_response(
                [{k: v for k, v in asdict(e).items() if v or k in ("name",)} for e in entries]
            )
        params = obj.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid("'parameters' must be a JSON object")
        if verb == "load":
            config = params.get("config")
            if config is not None and not isinstance(config, str):
                config = orjson.dumps(config).decode()  # an object given instead of its text
            # Decoding megabytes of base64 would stall the event loop: on a thread.
            files = await asyncio.to_thread(_files, params)
            await dp.load_model(model, config, files)
        else:
            dependents = params.get("unload_dependents", False)
            if not isinstance(dependents, bool):
                raise invalid("parameter 'unload_dependents' must be a boolean")
            await dp.unload_model(model, dependents)
        return Response(200)


def _files(params: dict[str, Any]) -> dict[str, bytes]:
    return {k: _base64(k, v) for k, v in params.items() if k.startswith("file:")}


def _base64(key: str, value: Any) -> bytes:
    """A ``file:<path>`` load parameter: the file's bytes as base64 text (Triton's form)."""
    if not isinstance(value, str):
        raise invalid(f"parameter '{key}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"parameter '{key}' is not valid base64: {exc}") from None


def _settings_object(body: bytes) -> dict[str, Any]:
    obj = codec._parse_json(body, "request body") if body.strip() else {}
    if not isinstance(obj, dict):
        raise invalid("request body must be a JSON object of settings")
    return obj


def _only(method: str, allowed: str) -> Response | None:
    return None if method == allowed else error_response(405, "Method Not Allowed")


def _shared_memory(verb: str, region: str | None) -> Response:
    # No region is ever registered: status lists none and unregister-all succeeds (perf_analyzer
    # calls it for both kinds before it starts), while register reports the gap clearly.
    if verb == "status":
        if region:
            return error_response(404, f"shared memory region '{region}' is not registered")
        return json_response([])
    if verb == "unregister":
        return Response(200)
    return error_response(501, "shared memory is not supported yet")


async def _unless_disconnected(work: Awaitable[Response], receive: Receive) -> Response:
    """Run ``work``, cancelling it if the client goes away first.

    Cancelling drops a queued request before it executes, so a departed client costs no
    device time.
    """
    current = asyncio.current_task()
    assert current is not None

    def on_message(watch: asyncio.Future[dict[str, Any]]) -> None:
        gone = not watch.cancelled() and watch.exception() is None
        if gone and watch.result().get("type") == "http.disconnect" and not finished:
            current.cancel()

    finished = False
    watcher = asyncio.ensure_future(receive())
    watcher.add_done_callback(on_message)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ServerError(ErrorCode.CANCELLED, "client disconnected") from None
        raise
    finally:
        finished = True
        watcher.cancel()


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The request body, refused (413) by Content-Length up front or once it passes ``limit``."""
    declared = _ascii_number(headers.get("content-length", ""))
    if declared is not None and declared > limit:
        raise _too_large("request body", limit, "--max-request-bytes")
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large("request body", limit, "--max-request-bytes")
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # chunked bodies declare no length: stop reading at the limit
            raise _too_large("request body", limit, "--max-request-bytes")
        parts.append(chunk)
    return b"".join(parts)
