"""Triton Python-backend models (``class TritonPythonModel``) served unchanged.

``backends/python.py`` hands a ``model.py`` defining ``TritonPythonModel`` here. As Triton does:
``initialize(args)`` once per instance (``args`` as Triton passes them), ``execute(requests)``
with one ``InferenceRequest`` per client request of the batch, returning one
``InferenceResponse`` per request in order (a response's error fails that request alone),
``finalize()`` at unload. ``async def execute`` runs on the event loop (``AsyncWorker``), so
``await request.async_exec()`` BLS calls block nothing. A decoupled model's ``execute``
returns None and sends responses through ``request.get_response_sender()``, from any thread.
"""

from __future__ import annotations

import inspect
import json
import logging
import queue
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kernelport.backends import triton_python_backend_utils as pb
from kernelport.core.backend import Arrays, LoadContext, RequestArrays
from kernelport.core.model_config import ModelConfig, triton_config
from kernelport.errors import ErrorCode, ServerError

log = logging.getLogger("kernelport.backends.python")

MODULE_NAME = "triton_python_backend_utils"
CLASS_NAME = "TritonPythonModel"

#: request parameters Triton's front ends consume (flags, options): not in ``parameters()``
RESERVED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output"}
)


def make_importable(source: bytes) -> None:
    """Let a model file ``import triton_python_backend_utils`` (only files that mention it)."""
    if MODULE_NAME.encode() in source:
        sys.modules.setdefault(MODULE_NAME, pb)


def initialize_args(context: LoadContext) -> dict[str, str]:
    """``initialize(args)`` as Triton's Python backend fills it."""
    config = context.config
    gpu = context.device.startswith("cuda")
    return {
        "model_config": json.dumps(triton_config(config)),
        "model_instance_kind": "GPU" if gpu else "CPU",
        "model_instance_name": f"{config.name}_0_{context.instance_index}",
        "model_instance_device_id": context.device.split(":")[1] if gpu else "0",
        "model_repository": str(context.version_path.parent),
        "model_version": context.version_path.name,
        "model_name": config.name,
    }


def load(module: types.ModuleType, context: LoadContext, path: Path) -> TritonPythonInstance:
    user = getattr(module, CLASS_NAME)()
    token = pb.current_models.set(context.models)
    try:
        if callable(getattr(user, "initialize", None)):
            user.initialize(initialize_args(context))
    finally:
        pb.current_models.reset(token)
    kind = (
        AsyncTritonPythonInstance
        if inspect.iscoroutinefunction(user.execute)
        else TritonPythonInstance
    )
    return kind(user, module, context.config, context.models)


class TritonPythonInstance:
    """One ``TritonPythonModel`` object, answering a batch request by request."""

    is_async = False

    def __init__(
        self, user: Any, module: types.ModuleType, config: ModelConfig, models: Any
    ) -> None:
        self._user = user
        self._module = module
        self._config = config
        self._models = models
        self._outputs = [t.name for t in config.outputs]

    def _requests(self, parts: list[Arrays]) -> list[pb.InferenceRequest]:
        return [self._request(inputs) for inputs in parts]

    def _request(self, inputs: Arrays) -> pb.InferenceRequest:
        given = inputs.parameters if isinstance(inputs, RequestArrays) else {}
        flags = 0
        if given.get("sequence_start"):
            flags |= pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
        if given.get("sequence_end"):
            flags |= pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        timeout = given.get("timeout", 0)
        return pb.InferenceRequest(
            self._config.name,
            self._outputs,
            [pb.Tensor(name, array) for name, array in inputs.items()],
            correlation_id=given.get("sequence_id") or 0,
            request_id=inputs.request_id if isinstance(inputs, RequestArrays) else "",
            flags=flags,
            timeout=timeout if isinstance(timeout, int) else 0,
            parameters={k: v for k, v in given.items() if k not in RESERVED_PARAMETERS},
        )

    def _answers(self, responses: Any, count: int) -> list[Arrays | ServerError]:
        if not isinstance(responses, list | tuple) or len(responses) != count:
            got = len(responses) if isinstance(responses, list | tuple) else type(responses)
            raise ServerError(
                ErrorCode.INTERNAL,
                f"model '{self._config.name}': execute() must return a list of one "
                f"InferenceResponse per request ({count}), got {got}",
            )
        answers: list[Arrays | ServerError] = []
        for response in responses:
            error = response.error()
            if error is not None:
                answers.append(pb.server_error(error))
            else:
                answers.append({t.name(): t.as_numpy() for t in response.output_tensors()})
        return answers

    def execute_parts(self, parts: list[Arrays], counts: list[int]) -> list[Arrays | ServerError]:
        token = pb.current_models.set(self._models)
        try:
            responses = self._user.execute(self._requests(parts))
        finally:
            pb.current_models.reset(token)
        return self._answers(responses, len(parts))

    def execute(self, inputs: Arrays) -> Arrays:
        """One request (when a wrapper hides ``execute_parts``)."""
        answer = self.execute_parts([inputs], [0])[0]
        if isinstance(answer, ServerError):
            raise answer
        return answer

    def stream(self, inputs: Arrays) -> Iterator[Arrays]:
        """A decoupled model's responses, as its response sender sends them."""
        arrived: queue.SimpleQueue[tuple[pb.InferenceResponse | None, int]] = queue.SimpleQueue()
        sender = pb.InferenceResponseSender(lambda r, f: arrived.put((r, f)))
        request = self._requests([inputs])[0]
        request._sender = sender
        token = pb.current_models.set(self._models)
        try:
            returned = self._user.execute([request])
        finally:
            pb.current_models.reset(token)
        if returned is not None:  # Triton refuses this too: responses go through the sender
            raise ServerError(
                ErrorCode.INTERNAL,
                f"model '{self._config.name}' is decoupled: execute() must return None and "
                "send responses with request.get_response_sender()",
            )
        try:
            while True:
                response, flags = arrived.get()
                if response is not None:
                    error = response.error()
                    if error is not None:
                        raise pb.server_error(error)
                    yield {t.name(): t.as_numpy() for t in response.output_tensors()}
                if flags & pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                    return
        finally:
            sender.cancelled = True  # the client went away: is_cancelled() tells the model

    def unload(self) -> None:
        try:
            if callable(getattr(self._user, "finalize", None)):
                token = pb.current_models.set(self._models)
                try:
                    self._user.finalize()
                finally:
                    pb.current_models.reset(token)
        except Exception:
            log.exception("model '%s': finalize() raised", self._config.name)
        finally:
            if sys.modules.get(self._module.__name__) is self._module:
                del sys.modules[self._module.__name__]
            self._user = None


class AsyncTritonPythonInstance(TritonPythonInstance):
    """``async def execute(self, requests)``: runs as a task on the event loop."""

    is_async = True

    async def execute_parts_async(
        self, parts: list[Arrays], counts: list[int]
    ) -> list[Arrays | ServerError]:
        pb.current_models.set(self._models)  # this task's own context
        responses = await self._user.execute(self._requests(parts))
        return self._answers(responses, len(parts))

    def execute_parts(self, parts: list[Arrays], counts: list[int]) -> list[Arrays | ServerError]:
        raise ServerError(
            ErrorCode.INTERNAL, f"model '{self._config.name}': execute() is a coroutine"
        )
