"""Shared by the model-lifecycle tests: ONNX models whose answer tells versions apart, and
polling with a deadline (never a sleep-and-hope)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer

T = TypeVar("T")

ADDER_YAML = "backend: onnxruntime\nmax_batch_size: 8\n"


def onnx_add(constant: float, dims: list[Any] | None = None, name: str = "add") -> bytes:
    """An ONNX graph OUTPUT0 = INPUT0 + constant (FP32, batch dim first)."""
    from onnx import TensorProto, helper

    dims = dims if dims is not None else [-1, 4]
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "C"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, dims)],
        initializer=[helper.make_tensor("C", TensorProto.FLOAT, [], [constant])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by every onnxruntime we support
    return bytes(model.SerializeToString())


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> tuple[T, float]:
    """Poll ``check`` until it returns something truthy; (that value, seconds it took)."""
    started = time.monotonic()
    while True:
        value = check()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def client_for(protocol: str, server: RunningServer) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def index_of(client: Any) -> dict[str, dict[str, Any]]:
    """The repository index as {name: entry} (the last entry wins for multi-version models)."""
    if isinstance(client, grpcclient.InferenceServerClient):
        models = client.get_model_repository_index(as_json=True).get("models", [])
    else:
        models = client.get_model_repository_index()
    return {m["name"]: m for m in models}


def add_once(client: Any, model: str, version: str = "") -> float:
    """Send [0, 0, 0, 0] to an adder model; the answer is its constant."""
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    inp = module.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
    result = client.infer(model, [inp], model_version=version)
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (1, 4) and np.all(out == out[0, 0]), out
    return float(out[0, 0])
