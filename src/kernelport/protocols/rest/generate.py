"""Triton's generate extension: ``POST /v2/models/{m}[/versions/{v}]/generate`` and
``.../generate_stream`` (server-sent events).

The body is one JSON object: each key naming a model input is that input's value (a scalar
or a nested list; strings for BYTES), ``parameters`` are the request's parameters, ``id``
its id. The answer is one JSON object per response: ``model_name``, ``model_version``, ``id``
when given, and each output by name (a one-element output as a scalar, strings decoded from
UTF-8). ``generate`` wants exactly one response; ``generate_stream`` sends every response of
a decoupled model as an event (``data: {...}``) as it is produced, and an error after the
stream has started as a last ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import numpy as np
import orjson

from kernelport.core.dataplane import DataPlane
from kernelport.core.model_config import ModelConfig
from kernelport.errors import ServerError, invalid
from kernelport.protocols.http_timeouts import DISCONNECT_EXTENSION
from kernelport.protocols.rest.errors import HTTP_STATUS
from kernelport.types import InferRequest, InferResponse, Tensor, datatype

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ROUTE = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"/(?P<verb>generate|generate_stream)$"
)
_RESERVED = {"parameters", "id"}
_EVENTS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def serve(
    dp: DataPlane, match: re.Match[str], body: bytes, scope: Scope, receive: Receive, send: Send
) -> None:
    """Answer one generate or generate_stream request (the route has matched)."""
    streaming = match["verb"] == "generate_stream"
    try:
        config = dp.model_config(match["model"], match["version"] or "")
        request = request_from_json(config, body, match["version"] or "")
        responses = dp.stream(request)
        if not streaming:
            answers = await _all(responses)
            if len(answers) != 1:
                raise invalid(
                    f"model '{config.name}' gave {len(answers)} responses: use generate_stream"
                )
            await _send_json(send, 200, response_json(answers[0]))
            return
    except ServerError as exc:
        await _send_json(send, HTTP_STATUS[exc.code], {"error": exc.message})
        return
    await _stream(responses, scope, receive, send)


async def _all(responses: AsyncGenerator[InferResponse, None]) -> list[InferResponse]:
    async with contextlib.aclosing(responses):
        return [r async for r in responses]


async def _stream(
    responses: AsyncGenerator[InferResponse, None], scope: Scope, receive: Receive, send: Send
) -> None:
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def hang_up() -> None:
        nonlocal gone
        if not gone:
            gone = True
            task.cancel()  # the model's generator is closed with the stream

    watch = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
    watcher = None
    if watch is not None:
        watch(hang_up)
    else:  # another ASGI server: the next receive() is the disconnect
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(lambda _: hang_up())
    started = False
    try:
        async with contextlib.aclosing(responses):
            async for answer in responses:
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": _EVENTS})
                    started = True
                await send({"type": "http.response.body", "more_body": True,
                            "body": _event(response_json(answer))})  # fmt: skip
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            return  # nobody to answer
        raise
    except ServerError as exc:
        if not started:
            await _send_json(send, HTTP_STATUS[exc.code], {"error": exc.message})
            return
        await send({"type": "http.response.body", "more_body": True,
                    "body": _event({"error": exc.message})})  # fmt: skip
    finally:
        gone = True  # from here on, a hang-up has nothing to cancel
        if watcher is not None:
            watcher.cancel()
    if not started:  # a decoupled model may answer nothing at all
        await send({"type": "http.response.start", "status": 200, "headers": _EVENTS})
    await send({"type": "http.response.body", "body": b""})


def request_from_json(config: ModelConfig, body: bytes, version: str) -> InferRequest:
    """The request a generate body describes, checked against nothing but JSON's rules here:
    the data plane checks the tensors against the model as for any request."""
    try:
        payload = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise invalid(f"generate: the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise invalid("generate: the body must be a JSON object")
    parameters = payload.get("parameters", {})
    if not isinstance(parameters, dict):
        raise invalid("generate: 'parameters' must be a JSON object")
    request_id = payload.get("id", "")
    if not isinstance(request_id, str):
        raise invalid("generate: 'id' must be a string")
    inputs = [_tensor(config, k, v) for k, v in payload.items() if k not in _RESERVED]
    return InferRequest(config.name, version, request_id, inputs, [], parameters)


def _tensor(config: ModelConfig, name: str, value: Any) -> Tensor:
    spec = config.input(name)
    if spec is None:
        known = ", ".join(t.name for t in config.inputs)
        raise invalid(f"model '{config.name}' has no input '{name}' (inputs: {known})")
    dt = datatype(spec.datatype)
    try:
        if dt.name == "BYTES":
            array = np.asarray(value, dtype=np.object_)
            flat = array.reshape(-1)
            for i, item in enumerate(flat):
                if isinstance(item, str):
                    flat[i] = item.encode()
                elif not isinstance(item, bytes):
                    raise TypeError(f"expected strings, got {type(item).__name__}")
        else:
            array = np.asarray(value, dtype=dt.numpy)
    except (TypeError, ValueError, OverflowError) as exc:
        raise invalid(f"generate: input '{name}' is not {dt.name} data: {exc}") from None
    if array.ndim == 0:
        array = array.reshape((1,) * max(len(spec.dims), 1))
    if config.batching and array.ndim == len(spec.dims):
        array = array[np.newaxis]  # one request is a batch of one
    return Tensor(name, dt.name, tuple(array.shape), array)


def response_json(response: InferResponse) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        out["id"] = response.id
    for tensor in response.outputs:
        data = tensor.data
        if tensor.datatype == "BYTES":
            items = [_text(v) for v in data.reshape(-1)]
            out[tensor.name] = (
                items[0]
                if len(items) == 1
                else np.array(items, dtype=np.object_).reshape(data.shape).tolist()
            )
        else:
            out[tensor.name] = data.reshape(-1)[0].item() if data.size == 1 else data.tolist()
    return out


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _send_json(send: Send, status: int, obj: dict[str, Any]) -> None:
    body = orjson.dumps(obj)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
