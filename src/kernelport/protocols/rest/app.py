"""A bare ASGI application for the V2 REST API (no framework: routing is a few regexes)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import orjson

from kernelport.core.dataplane import DataPlane
from kernelport.core.model_config import triton_config
from kernelport.core.shm import Kind
from kernelport.core.shm_sync import SharedRegions
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.limits import Limits
from kernelport.observability.telemetry import Telemetry
from kernelport.protocols.http_timeouts import DISCONNECT_EXTENSION
from kernelport.protocols.rest import codec, generate
from kernelport.protocols.rest.bodies import (
    decompress,
    read_body,
)
from kernelport.protocols.rest.errors import HTTP_STATUS
from kernelport.protocols.rest.inference import (
    RawHeaders,
    Response,
    RestInference,
    error_response,
    infer_target,
    json_response,
    until_hung_up,
)
from kernelport.protocols.rest.stats import statistics_json

log = logging.getLogger("kernelport.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_INFER_SUFFIX = "/infer"

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
        #: the inference route's work (compiled), also for servers that skip the ASGI cycle
        self.inference = RestInference(dataplane, self._telemetry, self._limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        # Bytes as given, decoded only where read; the last of a repeated header wins.
        headers: dict[bytes, bytes] = dict(scope["headers"])
        method, path = scope["method"], scope["path"]
        # Inference skips the route table: the hot path's only route, matched by hand.
        target = infer_target(path) if method == "POST" else None
        # Its model's queue counts it from now until it is submitted: a batch cut may wait
        # for it while its body is read and decoded (core/fill.py).
        announced = self._dp.announce(*target) if target is not None else None
        try:
            body = await read_body(receive, headers, self._limits.max_request_bytes)
            raw_encoding = headers.get(b"content-encoding")
            if body and raw_encoding:
                encoding = raw_encoding.decode("latin-1").strip().lower()
                if encoding not in ("", "identity"):
                    body = await decompress(body, encoding, self._limits.max_inflated_bytes)
            if target is not None:
                work = self.inference.infer(target[0], target[1], headers, body, announced)
                response = await _unless_disconnected(work, receive, scope)
            elif method == "POST" and (found := generate.ROUTE.match(path)) is not None:
                # answered as it streams: no Response to send here
                return await generate.serve(self._dp, found, body, scope, receive, send)
            elif path.endswith(_INFER_SUFFIX):
                route = self._route(method, path, headers, body)
                response = await _unless_disconnected(route, receive, scope)
            else:
                response = await self._route(method, path, headers, body)
        except ServerError as exc:
            response = error_response(HTTP_STATUS[exc.code], exc.message)
            if exc.code is ErrorCode.UNSUPPORTED and "Content-Encoding" in exc.message:
                response.headers.append((b"accept-encoding", b"gzip, deflate"))
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            response = error_response(500, "internal server error")
        finally:
            if announced is not None:  # failed, or cancelled, before it was submitted
                announced.release()
        response.headers.append((b"content-length", str(len(response.body)).encode()))
        await send(
            {"type": "http.response.start", "status": response.status, "headers": response.headers}
        )
        await send({"type": "http.response.body", "body": response.body})

    async def _route(self, method: str, path: str, headers: RawHeaders, body: bytes) -> Response:
        dp = self._dp
        if path.endswith("/") and len(path) > 1:
            path = path.rstrip("/")
        if path == "/v2/health/live":
            return _only(method, "GET") or Response(200 if dp.live() else 400)
        if path == "/v2/health/ready":
            return _only(method, "GET") or Response(200 if dp.ready() else 400)
        if path == "/v2":
            return _only(method, "GET") or json_response(asdict(dp.server_metadata()))
        # Kubernetes-style aliases, answered as on the metrics port (503 when not), so a
        # probe can target the HTTP port of an image that does not expose the metrics one.
        if path == "/healthz":
            return _only(method, "GET") or Response(200 if dp.live() else 503)
        if path == "/readyz":
            return _only(method, "GET") or Response(200 if dp.ready() else 503)
        if path == "/v2/trace/setting":
            return self._trace_setting(method, "", body)
        if path == "/v2/logging":
            if method == "POST":
                return json_response(self._telemetry.logs.update(_settings_object(body)))
            return _only(method, "GET") or json_response(self._telemetry.logs.get())
        if path == "/v2/models/stats":
            return _only(method, "GET") or json_response(
                statistics_json(await dp.node_statistics())
            )
        match = _MODEL.match(path)
        if match:
            return await self._model(
                method, match["model"], match["version"] or "", match["verb"], headers, body
            )
        if path == "/v2/repository/compact":  # admin scope, as the repository API
            refused = _only(method, "POST")
            return refused or json_response([asdict(r) for r in await dp.compact()])
        match = _REPO.match(path)
        if match and match["repo"] and match["verb"]:
            return error_response(501, "load and unload in a named repository are not supported")
        if match:
            return _only(method, "POST") or await self._repository(
                match["model"], match["verb"], body
            )
        match = _SHM.match(path)
        if match:
            verb = match["verb"]
            return _only(method, "GET" if verb == "status" else "POST") or await _shared_memory(
                dp.regions,
                "system" if match["kind"] == "system" else "cuda",
                verb,
                match["region"] or "",
                body,
            )
        return error_response(404, "Not Found")

    async def _model(
        self,
        method: str,
        model: str,
        version: str,
        verb: str | None,
        headers: RawHeaders,
        body: bytes,
    ) -> Response:
        dp = self._dp
        if verb == "infer":
            refused = _only(method, "POST")
            return refused or await self.inference.infer(model, version, headers, body)
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
        return json_response(statistics_json(await dp.node_statistics(model, version)))

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


async def _shared_memory(
    shared: SharedRegions, kind: Kind, verb: str, region: str, body: bytes
) -> Response:
    if verb == "status":
        if kind == "system":
            return json_response([asdict(s) for s in shared.registry.system_status(region)])
        return json_response([asdict(s) for s in shared.registry.cuda_status(region)])
    if verb == "unregister":
        await shared.unregister(kind, region)
        return Response(200)
    if not region:
        raise invalid("register needs a region name: /v2/<kind>sharedmemory/region/<name>/register")
    obj = _settings_object(body)
    if kind == "system":
        if "key" not in obj or "byte_size" not in obj:
            raise invalid("registering system shared memory needs 'key' and 'byte_size'")
        await shared.register_system(region, obj["key"], obj.get("offset", 0), obj["byte_size"])
        return Response(200)
    handle = obj.get("raw_handle")
    if not isinstance(handle, dict) or not isinstance(handle.get("b64"), str):
        raise invalid("registering CUDA shared memory needs 'raw_handle': {'b64': <handle>}")
    if "byte_size" not in obj:
        raise invalid("registering CUDA shared memory needs 'byte_size'")
    raw_handle = _base64("raw_handle", handle["b64"])
    await shared.register_cuda(region, raw_handle, obj.get("device_id", 0), obj["byte_size"])
    return Response(200)


# Without the server's disconnect callback, a client's departure is read from receive(), but
# only for requests still unanswered after this long: a task per request costs more than the
# whole front end otherwise, and only a request that waits has queued work worth dropping.
_WATCH_RECEIVE_AFTER_S = 0.002


async def _unless_disconnected(
    work: Awaitable[Response], receive: Receive, scope: Scope | None = None
) -> Response:
    """Run ``work``, cancelling it if the client goes away first.

    Cancelling drops a queued request before it executes, so a departed client costs no
    device time. KernelPort's uvicorn protocol reports a lost connection through the scope
    (``DISCONNECT_EXTENSION``: no task, no timer); under any other server a ``receive()``
    watches once the request has waited ``_WATCH_RECEIVE_AFTER_S``.
    """
    watch = scope.get("extensions", {}).get(DISCONNECT_EXTENSION) if scope else None
    return await until_hung_up(work, watch if watch is not None else _ReceiveWatch(receive).watch)


class _ReceiveWatch:
    """The same ``watch(hang_up | None)`` as the server's extension, by way of ``receive()``."""

    __slots__ = ("_hang_up", "_receive", "_timer", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._hang_up: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Future[dict[str, Any]] | None = None

    def watch(self, hang_up: Callable[[], None] | None) -> None:
        self._hang_up = hang_up
        if hang_up is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(_WATCH_RECEIVE_AFTER_S, self._start)
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def _start(self) -> None:
        self._watcher = asyncio.ensure_future(self._receive())
        self._watcher.add_done_callback(self._on_message)

    def _on_message(self, watcher: asyncio.Future[dict[str, Any]]) -> None:
        if watcher.cancelled() or watcher.exception() is not None or self._hang_up is None:
            return
        if watcher.result().get("type") == "http.disconnect":
            self._hang_up()
