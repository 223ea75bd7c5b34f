"""Meta models and Triton Python-backend models through the real server and tritonclient, over
HTTP and gRPC (the repository: tests/meta_models.py)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import RunningServer, running_server
from helpers import client_for, index_of
from meta_models import write_meta_repository
from tritonclient.utils import InferenceServerException

X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("meta")
    repo = write_meta_repository(tmp / "repo")
    with running_server(tmp, repo, wait_for="ready") as running:
        yield running


def _infer(client: Any, protocol: str, model: str, name: str, data: np.ndarray) -> Any:
    module = grpcclient if protocol == "grpc" else __import__("tritonclient.http").http
    tensor = module.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor])


def _batches(client: Any, protocol: str, model: str) -> dict[int, int]:
    if protocol == "grpc":
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    else:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_meta_model_over_tritonclient(server: RunningServer, protocol: str) -> None:
    client = client_for(protocol, server)
    before = _batches(client, protocol, "scale").get(2, 0)
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def meta() -> None:
        own = client_for(protocol, server)
        try:
            done.put(_infer(own, protocol, "combo", "X", X))
        except Exception as exc:
            done.put(exc)

    thread = threading.Thread(target=meta)
    thread.start()
    # scale cuts only full batches of 2: this direct request completes with the meta call's.
    direct = _infer(client, protocol, "scale", "INPUT0", X)
    thread.join()
    answer = done.get()
    assert not isinstance(answer, Exception), answer
    np.testing.assert_array_equal(direct.as_numpy("OUTPUT0"), X * 2)
    np.testing.assert_array_equal(answer.as_numpy("A"), X * 2)
    np.testing.assert_array_equal(answer.as_numpy("B"), X + 1)
    assert _batches(client, protocol, "scale").get(2, 0) == before + 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_hidden_and_errors_over_tritonclient(server: RunningServer, protocol: str) -> None:
    client = client_for(protocol, server)
    with pytest.raises(InferenceServerException) as caught:
        _infer(client, protocol, "secret", "INPUT0", X)
    assert "model 'secret' is not found" in str(caught.value.message())
    code = "StatusCode.NOT_FOUND" if protocol == "grpc" else "404"
    assert str(caught.value.status()) == code
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("secret")
    assert "secret" not in index_of(client)
    np.testing.assert_array_equal(
        _infer(client, protocol, "uses_secret", "X", X).as_numpy("A"), X * 3
    )
    with pytest.raises(InferenceServerException) as caught:
        _infer(client, protocol, "wrong", "X", X)
    code = "StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"
    assert str(caught.value.status()) == code
    assert "'wrong' calling 'add_one'" in str(caught.value.message())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["bls", "bls_async"])
def test_triton_bls_model(server: RunningServer, protocol: str, model: str) -> None:
    client = client_for(protocol, server)
    result = _infer(client, protocol, model, "RAW", X)
    np.testing.assert_array_equal(result.as_numpy("OUT"), X * 10 + 1)


def test_triton_decoupled_model_streams(server: RunningServer, tmp_path: Path) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    arrived: queue.SimpleQueue[Any] = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: arrived.put((result, error)))
    text = grpcclient.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"streams of words"], dtype=object))
    client.async_stream_infer("words", [text], request_id="r1", enable_empty_final_response=True)
    words = []
    while True:
        result, error = arrived.get(timeout=30)
        assert error is None, error
        response = result.get_response()
        if response.parameters["triton_final_response"].bool_param:
            break
        words.append(result.as_numpy("WORD")[0])
    client.stop_stream()
    assert words == [b"streams", b"of", b"words"]
