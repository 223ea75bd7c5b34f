"""Triton's ``triton_python_backend_utils`` for ``model.py`` files written for Triton's Python
backend, so they serve unchanged (``backends/triton_python.py`` runs them).

Loading such a file makes this module importable as ``triton_python_backend_utils`` (an entry
in ``sys.modules``; no top-level package is installed). Tensors are numpy arrays in host
memory. BLS calls (``InferenceRequest(...).exec()`` / ``async_exec()``) are KernelPort's
meta-model calls (``core/meta.py``): they go through the called model's batcher, tensors by
reference; they are allowed from ``initialize``, ``execute`` and ``finalize`` (and from code
running in a context copied from them), where the calling model is known.
"""

from __future__ import annotations

import contextvars
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import numpy as np

from kernelport.errors import ErrorCode, ServerError
from kernelport.types import datatype, datatype_of

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_REQUEST_RELEASE_ALL = 1

#: the calling model's ``Models`` handle, set while its code runs (for BLS)
current_models: contextvars.ContextVar[Any] = contextvars.ContextVar("pb_utils_models")


class TritonError(Exception):
    """An error a response carries (or a model raises), with Triton's codes."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        super().__init__(message)
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    """Raised by BLS helpers in Triton; a model may raise it to fail its requests."""

    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


_TO_CODE = {
    TritonError.INTERNAL: ErrorCode.INTERNAL,
    TritonError.UNKNOWN: ErrorCode.INTERNAL,
    TritonError.NOT_FOUND: ErrorCode.NOT_FOUND,
    TritonError.INVALID_ARG: ErrorCode.INVALID_ARGUMENT,
    TritonError.UNAVAILABLE: ErrorCode.UNAVAILABLE,
    TritonError.UNSUPPORTED: ErrorCode.UNSUPPORTED,
    TritonError.ALREADY_EXISTS: ErrorCode.ALREADY_EXISTS,
    TritonError.CANCELLED: ErrorCode.CANCELLED,
}
_FROM_CODE = {code: triton for triton, code in reversed(_TO_CODE.items())}


def server_error(error: TritonError) -> ServerError:
    """The server's error for a response's ``TritonError``."""
    return ServerError(_TO_CODE.get(error.code(), ErrorCode.INTERNAL), error.message())


def triton_error(error: ServerError) -> TritonError:
    return TritonError(error.message, _FROM_CODE.get(error.code, TritonError.INTERNAL))


class Tensor:
    """A named tensor: a numpy array in host memory."""

    def __init__(self, name: str, data: Any, dtype: Any = None) -> None:
        array = data if isinstance(data, np.ndarray) else np.asarray(data, dtype=dtype)
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray[Any, Any]:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> str:
        return datatype_of(self._array).config_name

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        """From an object with ``__dlpack__`` (a torch tensor on the CPU, an array...)."""
        return Tensor(name, np.from_dlpack(capsule))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, {self._array!r})"


class InferenceResponse:
    """One response: output tensors, or an error that fails its request only."""

    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: dict[str, Any] | str | None = None,
    ) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = parameters

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        given = self._parameters
        return given if isinstance(given, str) else json.dumps(given or {})


class InferenceResponseSender:
    """A decoupled request's sender: any number of responses, then the final flag."""

    def __init__(self, deliver: Callable[[InferenceResponse | None, int], None]) -> None:
        self._deliver = deliver
        self._final = False
        self._lock = threading.Lock()
        self.cancelled = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        with self._lock:
            if self._final:
                raise TritonError("the final response was already sent for this request")
            self._final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self._deliver(response, flags)

    def is_cancelled(self) -> bool:
        return self.cancelled


class InferenceRequest:
    """A request given to ``execute``, or built by the model for a BLS call."""

    def __init__(
        self,
        model_name: str = "",
        requested_output_names: Sequence[str] = (),
        inputs: Sequence[Tensor] = (),
        model_version: int = -1,
        correlation_id: int | str = 0,
        request_id: str = "",
        flags: int = 0,
        timeout: int = 0,
        preferred_memory: Any = None,
        trace: Any = None,
        parameters: dict[str, Any] | str | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self._outputs = list(requested_output_names)
        self._inputs = list(inputs)
        self._correlation_id = correlation_id
        self._request_id = request_id
        self._flags = flags
        self._timeout = timeout
        given = parameters if parameters is not None else {}
        self._parameters = json.loads(given) if isinstance(given, str) else dict(given)
        self._sender: InferenceResponseSender | None = None

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._outputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def is_cancelled(self) -> bool:
        return self._sender is not None and self._sender.cancelled

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            raise TritonError("only a decoupled model's requests have a response sender")
        return self._sender

    def set_release_flags(self, flags: int) -> None:
        """Requests are released by the server when execute returns; nothing to change."""

    # --- BLS -----------------------------------------------------------------------------

    def _call(self) -> tuple[Any, dict[str, Any], list[str] | None, dict[str, Any]]:
        models = current_models.get(None)
        if models is None:
            raise TritonModelException(
                "BLS calls can be made only from the model's initialize, execute or finalize "
                "(or a thread started with contextvars.copy_context().run)"
            )
        inputs = {t.name(): t.as_numpy() for t in self._inputs}
        params = dict(self._parameters)
        if self._timeout:
            params.setdefault("timeout", self._timeout)
        return models, inputs, self._outputs or None, params

    def exec(self, decoupled: bool = False) -> Any:
        """Run the request on ``model_name``: its response (errors inside the response), or
        an iterator of its responses when ``decoupled``."""
        models, inputs, outputs, params = self._call()
        version = "" if self.model_version < 0 else str(self.model_version)
        if decoupled:
            return _responses(models.stream_sync(self.model_name, inputs, outputs, params))
        try:
            return _response(models.infer_sync(self.model_name, inputs, outputs, version, params))
        except ServerError as exc:
            return InferenceResponse(error=triton_error(exc))

    async def async_exec(self, decoupled: bool = False) -> Any:
        """:meth:`exec` from an ``async def execute``."""
        models, inputs, outputs, params = self._call()
        version = "" if self.model_version < 0 else str(self.model_version)
        if decoupled:
            return _async_responses(models.stream(self.model_name, inputs, outputs, params))
        try:
            return _response(await models.infer(self.model_name, inputs, outputs, version, params))
        except ServerError as exc:
            return InferenceResponse(error=triton_error(exc))


def _response(arrays: dict[str, Any]) -> InferenceResponse:
    return InferenceResponse([Tensor(name, array) for name, array in arrays.items()])


def _responses(produced: Iterator[dict[str, Any]]) -> Iterator[InferenceResponse]:
    try:
        for arrays in produced:
            yield _response(arrays)
    except ServerError as exc:
        yield InferenceResponse(error=triton_error(exc))


async def _async_responses(produced: AsyncIterator[dict[str, Any]]) -> AsyncIterator[Any]:
    try:
        async for arrays in produced:
            yield _response(arrays)
    except ServerError as exc:
        yield InferenceResponse(error=triton_error(exc))


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((t for t in model_config.get("input", []) if t.get("name") == name), None)


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((t for t in model_config.get("output", []) if t.get("name") == name), None)


def triton_string_to_numpy(triton_type: str) -> Any:
    """``TYPE_FP32`` -> ``np.float32`` (``TYPE_STRING`` -> ``np.object_``)."""
    return datatype(triton_type).numpy


def numpy_to_triton_type(dtype: Any) -> str:
    return datatype_of(np.empty(0, dtype=dtype)).config_name
