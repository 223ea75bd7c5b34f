"""Every exception in a handler becomes a clean error for that request: the stream carries on,
unary calls and REST answer "internal server error" without leaking internals."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from conftest import RunningServer, running_server
from tritonclient.utils import InferenceServerException

# A negative input makes the model return text for a FP32 output: converting it raises a
# ValueError in the data plane, outside the worker's wrapping of model errors.
WRONG_OUTPUT = """
import numpy as np

class Model:
    def execute(self, inputs):
        x = inputs["X"]
        if (x < 0).any():
            return {"Y": np.array(["not a number"] * len(x), dtype=object)}
        return {"Y": x * 2}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("stream")
    repo = tmp / "repo"
    (repo / "odd" / "1").mkdir(parents=True)
    (repo / "odd" / "1" / "model.py").write_text(WRONG_OUTPUT)
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "inputs": [{"name": "X", "datatype": "FP32", "dims": [1]}],
        "outputs": [{"name": "Y", "datatype": "FP32", "dims": [1]}],
    }
    (repo / "odd" / "model.yaml").write_text(yaml.safe_dump(config))
    with running_server(tmp, repo, wait_for="ready") as running:
        yield running


def _input(value: float) -> Any:
    inp = grpcclient.InferInput("X", [1], "FP32")
    inp.set_data_from_numpy(np.array([value], np.float32))
    return inp


def test_stream_answers_an_unexpected_error_and_stays_usable(server: RunningServer) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("odd", [_input(-1.0)], request_id="bad-1")
        result, error = answers.get(timeout=30)
        assert result is None
        assert isinstance(error, InferenceServerException)
        assert "internal server error" in str(error)
        assert "not a number" not in str(error)  # no internals leak
        client.async_stream_infer("odd", [_input(3.0)], request_id="good-2")
        result, error = answers.get(timeout=30)
        assert error is None, error
        assert result.get_response().id == "good-2"
        assert result.as_numpy("Y").tolist() == [6.0]
    finally:
        client.stop_stream()
        client.close()
    log = server.log()
    assert "unhandled error in ModelStreamInfer on model 'odd'" in log
    assert log.count("Traceback") >= 1


def test_stream_error_carries_the_request_id(server: RunningServer) -> None:
    # tritonclient hides the id of a failed stream response; read the raw stream instead.
    import grpc

    from kernelport.schema import pb

    channel = grpc.insecure_channel(server.grpc_url)
    stream = channel.stream_stream(
        f"/{pb.INFERENCE_SERVICE}/ModelStreamInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.inference.ModelStreamInferResponse.FromString,
    )

    def requests() -> Iterator[Any]:
        for request_id, value in (("bad-7", -1.0), ("good-8", 1.0)):
            msg = pb.inference.ModelInferRequest(model_name="odd", id=request_id)
            msg.inputs.add(name="X", datatype="FP32", shape=[1])
            msg.raw_input_contents.append(np.array([value], np.float32).tobytes())
            yield msg

    try:
        replies = {r.infer_response.id: r for r in stream(requests(), timeout=30)}
    finally:
        channel.close()
    assert replies["bad-7"].error_message == "internal server error"
    assert replies["good-8"].error_message == ""


def test_unary_grpc_rest_and_kernelport_v1_answer_internal_error(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("odd", [_input(-1.0)])
        assert info.value.status() == "StatusCode.INTERNAL"
        assert "internal server error" in str(info.value)
        assert client.infer("odd", [_input(1.0)]).as_numpy("Y").tolist() == [2.0]
    finally:
        client.close()
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1],
                                   "data": [-1.0]}]}).encode()  # fmt: skip
    url = f"http://{server.http_url}/v2/models/odd/infer"
    with pytest.raises(urllib.error.HTTPError) as http_info:
        urllib.request.urlopen(urllib.request.Request(url, body), timeout=30)
    with http_info.value as error:
        assert error.code == 500
        assert json.loads(error.read()) == {"error": "internal server error"}
        assert error.headers["x-request-id"]
    _kernelport_v1_answers_internal_error(server)


def _kernelport_v1_answers_internal_error(server: RunningServer) -> None:
    import grpc

    from kernelport.schema import pb

    channel = grpc.insecure_channel(server.grpc_url)
    infer = channel.unary_unary(
        f"/{pb.KERNELPORT_SERVICE}/Infer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.kernelport_v1.InferResponse.FromString,
    )
    msg = pb.kernelport_v1.InferRequest(model="odd")
    data = np.array([-1.0], np.float32).tobytes()
    msg.inputs.add(name="X", dtype=pb.kernelport_v1.DType.Value("F32"), shape=[1], data=data)
    try:
        with pytest.raises(grpc.RpcError) as info:
            infer(msg, timeout=30)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == "internal server error"
    finally:
        channel.close()
