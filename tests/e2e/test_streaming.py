"""Decoupled models (any number of responses per request) over gRPC streams and HTTP
generate / generate_stream (server-sent events), with cancellation closing the model's
generator. Triton config.pbtxt models with ``model_transaction_policy { decoupled: true }``."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import RunningServer, running_server
from tritonclient.utils import InferenceServerException

COUNTER_PBTXT = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""

COUNTER_PY = """
import numpy as np

class Model:
    def execute(self, inputs):
        for i in range(int(inputs["N"][0])):
            yield {"OUT": np.array([i], np.int32)}
"""

WORDS_PBTXT = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
"""

WORDS_PY = """
import numpy as np

class Model:
    def execute(self, inputs):
        for word in inputs["text_input"][0].decode().split():
            yield {"text_output": np.array([word.encode()], dtype=object)}
"""

# Yields until closed; its finally block leaves a file behind, so a test can see it ran.
ENDLESS_PBTXT = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "TAG" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
parameters { key: "markers" value: { string_value: "%s" } }
"""

ENDLESS_PY = """
import itertools
import time
from pathlib import Path

import numpy as np

class Model:
    def load(self, config):
        self.markers = Path(config.parameters["markers"])

    def execute(self, inputs):
        tag = inputs["TAG"][0].decode()
        try:
            for i in itertools.count():
                yield {"OUT": np.array([i], np.int32)}
                time.sleep(0.005)
        finally:
            (self.markers / tag).write_text("closed")
"""


def _model(repo: Path, name: str, pbtxt: str, code: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(pbtxt)
    (repo / name / "1" / "model.py").write_text(code)


@pytest.fixture(scope="module")
def markers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, markers: Path) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("decoupled")
    _model(repo, "counter", COUNTER_PBTXT, COUNTER_PY)
    _model(repo, "words", WORDS_PBTXT, WORDS_PY)
    _model(repo, "endless", ENDLESS_PBTXT % markers, ENDLESS_PY)
    with running_server(repo, repo) as running:
        yield running


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear: the generator was not closed"
        time.sleep(0.02)


class _Stream:
    """A tritonclient gRPC stream whose answers land in a queue."""

    def __init__(self, server: RunningServer) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def next(self) -> Any:
        result, error = self.answers.get(timeout=30)
        if error is not None:
            raise error
        return result

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _input(name: str, value: Any, datatype: str) -> grpcclient.InferInput:
    array = np.array([value], dtype=object if datatype == "BYTES" else np.int32)
    inp = grpcclient.InferInput(name, [1], datatype)
    inp.set_data_from_numpy(array)
    return inp


def test_a_grpc_stream_delivers_every_response_in_order_then_the_final_flag(
    server: RunningServer,
) -> None:
    stream = _Stream(server)
    try:
        stream.client.async_stream_infer(
            "counter", [_input("N", 5, "INT32")], request_id="r1",
            enable_empty_final_response=True,
        )  # fmt: skip
        outs, finals = [], []
        while True:
            result = stream.next()
            response = result.get_response()
            assert response.id == "r1"
            finals.append(response.parameters["triton_final_response"].bool_param)
            if finals[-1]:
                assert result.as_numpy("OUT") is None  # the empty final response
                break
            outs.append(int(result.as_numpy("OUT")[0]))
        assert outs == [0, 1, 2, 3, 4]
        assert finals == [False] * 5 + [True]
    finally:
        stream.close()


def test_interleaved_streams_keep_their_own_responses(server: RunningServer) -> None:
    stream = _Stream(server)
    try:
        for n, rid in ((3, "a"), (4, "b"), (2, "c")):
            stream.client.async_stream_infer(
                "counter", [_input("N", n, "INT32")], request_id=rid,
                enable_empty_final_response=True,
            )  # fmt: skip
        seen: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        finished = 0
        while finished < 3:
            result = stream.next()
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                finished += 1
            else:
                seen[response.id].append(int(result.as_numpy("OUT")[0]))
        assert seen == {"a": [0, 1, 2], "b": [0, 1, 2, 3], "c": [0, 1]}
    finally:
        stream.close()


def test_unary_infer_on_a_decoupled_model_says_how_to_call_it(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="is decoupled") as info:
            client.infer("counter", [_input("N", 2, "INT32")])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        config = client.get_model_config("counter", as_json=True)["config"]
        assert config["model_transaction_policy"] == {"decoupled": True}
    finally:
        client.close()


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def test_generate_stream_sends_each_response_as_an_event(server: RunningServer) -> None:
    url = f"http://{server.http_url}/v2/models/words/generate_stream"
    with httpx.stream("POST", url, json={"text_input": "the quick brown fox"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        events = list(_events(response))
    assert [e["text_output"] for e in events] == ["the", "quick", "brown", "fox"]
    assert all(e["model_name"] == "words" and e["model_version"] == "1" for e in events)


def test_generate_wants_exactly_one_response(server: RunningServer) -> None:
    url = f"http://{server.http_url}/v2/models/words/generate"
    one = httpx.post(url, json={"text_input": "hello", "id": "g1"})
    assert one.status_code == 200
    assert one.json() == {"model_name": "words", "model_version": "1", "id": "g1",
                          "text_output": "hello"}  # fmt: skip
    many = httpx.post(url, json={"text_input": "hello world"})
    assert many.status_code == 400
    assert "gave 2 responses: use generate_stream" in many.json()["error"]
    wrong = httpx.post(url, json={"prompt": "hello"})
    assert wrong.status_code == 400
    assert "has no input 'prompt' (inputs: text_input)" in wrong.json()["error"]
    # and a model that is not decoupled answers generate too
    demo = httpx.post(f"http://{server.http_url}/v2/models/counter/generate", json={"N": "x"})
    assert demo.status_code == 400 and "input 'N' is not INT32 data" in demo.json()["error"]


def test_cancelling_a_grpc_stream_closes_the_generator(
    server: RunningServer, markers: Path
) -> None:
    stream = _Stream(server)
    stream.client.async_stream_infer("endless", [_input("TAG", b"grpc", "BYTES")])
    for _ in range(3):
        stream.next()
    stream.close(cancel=True)
    _wait_for(markers / "grpc")


def test_a_client_leaving_generate_stream_closes_the_generator(
    server: RunningServer, markers: Path
) -> None:
    url = f"http://{server.http_url}/v2/models/endless/generate_stream"
    with httpx.stream("POST", url, json={"TAG": "http"}) as response:
        events = _events(response)
        assert [next(events)["OUT"] for _ in range(3)] == [0, 1, 2]
    _wait_for(markers / "http")
