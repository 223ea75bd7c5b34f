"""The demo repository's PyTorch and Python models, served and checked against bare runtimes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer

from kernelport.config import demo_repository


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, demo_server: RunningServer) -> Iterator[Any]:
    if request.param == "http":
        c: Any = httpclient.InferenceServerClient(demo_server.http_url)
    else:
        c = grpcclient.InferenceServerClient(demo_server.grpc_url)
    yield c
    c.close()


def infer(client: Any, model: str, name: str, array: np.ndarray) -> Any:
    mod = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    item = mod.InferInput(name, list(array.shape), "FP32")
    item.set_data_from_numpy(array)
    return client.infer(model, [item])


def test_torch_mlp_matches_bare_pytorch(client: Any) -> None:
    features = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    result = infer(client, "torch_mlp", "features", features)
    program = torch.export.load(str(demo_repository() / "torch_mlp" / "1" / "model.pt2"))
    with torch.inference_mode():
        expected = program.module()(torch.from_numpy(features))["logits"].numpy()
    # Not bit for bit: a CPU matmul splits its rows by the threads it gets, and a busy
    # machine gives the server and this process different counts (a CI run saw one row
    # differ by 1-2 ULP); a wrong model or a mixed-up row is off by far more.
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)


def test_python_softmax_chains_with_torch_mlp(client: Any) -> None:
    features = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)
    logits = infer(client, "torch_mlp", "features", features).as_numpy("logits")
    result = infer(client, "python_softmax", "LOGITS", logits)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), probs, rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("CLASS")[:, 0], logits.argmax(axis=1))
