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
from helpers import index_of, onnx_add

__all__ = ["ADDER_YAML", "add_once", "client_for", "index_of", "onnx_add", "wait_for"]

T = TypeVar("T")

ADDER_YAML = "backend: onnxruntime\nmax_batch_size: 8\n"


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


def add_once(client: Any, model: str, version: str = "") -> float:
    """Send [0, 0, 0, 0] to an adder model; the answer is its constant."""
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    inp = module.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
    result = client.infer(model, [inp], model_version=version)
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (1, 4) and np.all(out == out[0, 0]), out
    return float(out[0, 0])
