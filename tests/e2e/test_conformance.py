"""Client mistakes get Triton's clean 400 / INVALID_ARGUMENT, never a 500 or silent conversion."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import RunningServer, running_server
from helpers import identity_config, write_model
from tritonclient.utils import InferenceServerException

TYPES = ("INT32", "FP32", "BOOL", "UINT8", "INT64")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("conform")
    for dtype in TYPES:
        write_model(repo, f"id_{dtype.lower()}", identity_config(dtype, [2], max_batch_size=4))
    write_model(
        repo,
        "prio",
        identity_config("FP32", [2], max_batch_size=4, dynamic_batching={"priority_levels": 2}),
    )
    with running_server(repo, repo, wait_for="ready") as running:
        yield running


def _post(
    server: RunningServer, model: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    url = f"http://{server.http_url}/v2/models/{model}/infer"
    request = urllib.request.Request(url, body, headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _json_infer(
    server: RunningServer, dtype: str, data: Any, parameters: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {
        "inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": dtype, "data": data}]
    }
    if parameters is not None:
        body["parameters"] = parameters
    model = "prio" if parameters is not None else f"id_{dtype.lower()}"
    return _post(server, model, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("dtype", "bad"),
    [
        ("INT32", None),
        ("INT32", True),
        ("INT32", "1.5"),
        ("INT32", 1.5),
        ("INT32", 2**40),
        ("FP32", None),
        ("FP32", True),
        ("FP32", "1"),
        ("BOOL", 1),
        ("UINT8", 300),
        ("UINT8", -1),
        ("INT64", 2**63),
    ],
)
def test_json_data_must_match_the_datatype(server: RunningServer, dtype: str, bad: Any) -> None:
    status, body = _json_infer(server, dtype, [[bad, 0 if dtype != "BOOL" else False]])
    assert status == 400, body
    assert "input 'INPUT0'" in body["error"]
    assert dtype in body["error"]


@pytest.mark.parametrize(
    ("dtype", "data", "want"),
    [
        ("INT32", [[-(2**31), 2**31 - 1]], [[-(2**31), 2**31 - 1]]),
        ("FP32", [1, 2.5], [[1.0, 2.5]]),  # flat, integers into floats: fine
        ("BOOL", [[True], [False]], [[True, False]]),  # nesting that differs from the shape
        ("UINT8", [[0, 255]], [[0, 255]]),
    ],
)
def test_valid_json_data_still_works(
    server: RunningServer, dtype: str, data: Any, want: Any
) -> None:
    status, body = _json_infer(server, dtype, data)
    assert status == 200, body
    assert body["outputs"][0]["data"] == [x for row in want for x in row]


@pytest.mark.parametrize("length", ["\u00b2\u00b3", "1\u00b9", "\u00b9 "])
def test_unicode_digits_in_header_length_are_refused(server: RunningServer, length: str) -> None:
    # Superscript digits survive the header's latin-1 decoding and pass str.isdigit(), but
    # int() refuses them: only ASCII digits are a length.
    body = json.dumps({"inputs": []}).encode()
    status, payload = _post(server, "id_fp32", body, {"Inference-Header-Content-Length": length})
    assert status == 400, payload
    assert "Inference-Header-Content-Length" in payload["error"]


BAD_PARAMETERS = [
    ("timeout", math.inf),
    ("timeout", math.nan),
    ("timeout", -1),
    ("timeout", "x"),
    ("timeout", "100"),
    ("timeout", True),
    ("timeout", 1.5),
    ("priority", -1),
    ("priority", 2**64),
    ("priority", 1.5),
    ("priority", "1"),
    ("priority", False),
]


@pytest.mark.parametrize(("name", "value"), BAD_PARAMETERS)
def test_bad_request_parameters_over_http(server: RunningServer, name: str, value: Any) -> None:
    # json.dumps writes Infinity / NaN, which orjson (like Triton's parser) may refuse as
    # JSON: either way it is a 400 that names the problem, never a 500.
    status, body = _json_infer(server, "FP32", [[1.0, 2.0]], {name: value})
    assert status == 400, body
    if math.isfinite(value) if isinstance(value, float) else True:
        assert f"parameter '{name}'" in body["error"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("timeout", math.inf),
        ("timeout", math.nan),
        ("timeout", -1),
        ("timeout", "x"),
        ("priority", 1.5),
        ("priority", "x"),
    ],
)
def test_bad_request_parameters_over_grpc(server: RunningServer, name: str, value: Any) -> None:
    # tritonclient only sends int64 timeout / uint64 priority, so build the request with its
    # protobuf messages to send what other clients can.
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="prio")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.zeros((1, 2), np.float32).tobytes())
    param = request.parameters[name]
    if isinstance(value, str):
        param.string_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.int64_param = value
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"parameter '{name}'" in (info.value.details() or "")


def test_negative_timeout_from_tritonclient(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 2), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("prio", [inp], timeout=-1)
    client.close()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "parameter 'timeout'" in str(info.value)


def test_good_parameters_are_accepted(server: RunningServer) -> None:
    status, body = _json_infer(server, "FP32", [[1.0, 2.0]], {"timeout": 10_000_000, "priority": 5})
    assert status == 200, body  # a priority past the levels means the default (Triton's rule)
