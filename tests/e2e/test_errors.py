"""Bad requests get a clear error naming what was wrong, and the server keeps serving."""

from __future__ import annotations

import contextlib
import gzip
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, write_model
from tritonclient.utils import InferenceServerException


def _post(
    server: RunningServer, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://{server.http_url}{path}", body, headers or {})
    try:
        with urllib.request.urlopen(request) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _infer_json(server: RunningServer, model: str, inputs: list[dict[str, Any]]) -> tuple[int, str]:
    status, body = _post(
        server, f"/v2/models/{model}/infer", json.dumps({"inputs": inputs}).encode()
    )
    return status, body.get("error", "")


def _simple_input(
    name: str = "INPUT0", shape: list[int] | None = None, datatype: str = "INT32", data: Any = None
) -> dict[str, Any]:
    shape = shape or [1, 16]
    return {
        "name": name,
        "shape": shape,
        "datatype": datatype,
        "data": data if data is not None else [1] * int(np.prod(shape)),
    }


CASES = [
    ("unknown model", "nope", [_simple_input()], 404, "model 'nope' is not found"),
    (
        "wrong input name",
        "simple",
        [_simple_input("INPUT9"), _simple_input("INPUT1")],
        400,
        "has no input 'INPUT9'",
    ),
    ("missing input", "simple", [_simple_input()], 400, "missing input(s) INPUT1"),
    (
        "wrong datatype",
        "simple",
        [_simple_input(datatype="FP32"), _simple_input("INPUT1")],
        400,
        "datatype FP32, expected INT32",
    ),
    (
        "wrong rank",
        "simple",
        [_simple_input(shape=[16]), _simple_input("INPUT1")],
        400,
        "has rank 1, expected 2",
    ),
    (
        "wrong dim",
        "simple",
        [_simple_input(shape=[1, 15]), _simple_input("INPUT1", [1, 15])],
        400,
        "dimension 1: got 15, expected 16",
    ),
    (
        "element count",
        "simple",
        [_simple_input(data=[1, 2]), _simple_input("INPUT1")],
        400,
        "needs 16 elements, got 2",
    ),
    (
        "batch mismatch",
        "simple",
        [_simple_input(shape=[2, 16]), _simple_input("INPUT1")],
        400,
        "batch size 1 differs",
    ),
    (
        "bad datatype",
        "simple",
        [_simple_input(datatype="FLOAT"), _simple_input("INPUT1")],
        400,
        "unknown datatype 'FLOAT'",
    ),
]


@pytest.mark.parametrize(
    ("case", "model", "inputs", "status", "message"), CASES, ids=[c[0] for c in CASES]
)
def test_http_errors(
    demo_server: RunningServer, case: str, model: str, inputs: Any, status: int, message: str
) -> None:
    got_status, error = _infer_json(demo_server, model, inputs)
    assert (got_status, message in error) == (status, True), error


GRPC_CASES = [
    (
        "unknown model",
        "nope",
        {"INPUT0": np.ones((1, 16), np.int32)},
        grpc.StatusCode.NOT_FOUND,
        "model 'nope' is not found",
    ),
    ("wrong byte size", "simple", None, grpc.StatusCode.INVALID_ARGUMENT, "needs 64 bytes, got 60"),
    (
        "missing input",
        "simple",
        {"INPUT0": np.ones((1, 16), np.int32)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing input(s) INPUT1",
    ),
    (
        "wrong datatype",
        "simple",
        {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.int32)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "datatype FP32, expected INT32",
    ),
]


@pytest.mark.parametrize(
    ("case", "model", "arrays", "code", "message"), GRPC_CASES, ids=[c[0] for c in GRPC_CASES]
)
def test_grpc_errors(
    demo_server: RunningServer,
    case: str,
    model: str,
    arrays: Any,
    code: grpc.StatusCode,
    message: str,
) -> None:
    from kernelport.schema import pb

    request = pb.inference.ModelInferRequest(model_name=model)
    if arrays is None:  # a raw buffer shorter than the shape needs
        for name in ("INPUT0", "INPUT1"):
            request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.extend([b"\0" * 60, b"\0" * 64])
    else:
        for name, array in arrays.items():
            dtype = "FP32" if array.dtype == np.float32 else "INT32"
            request.inputs.add(name=name, datatype=dtype, shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
    with grpc.insecure_channel(demo_server.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.inference.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(request)
    assert info.value.code() == code
    assert message in info.value.details()


def test_client_errors_raise_inference_exceptions(demo_server: RunningServer) -> None:
    for client in (
        httpclient.InferenceServerClient(demo_server.http_url),
        grpcclient.InferenceServerClient(demo_server.grpc_url),
    ):
        with pytest.raises(InferenceServerException, match="not found"):
            client.get_model_metadata("missing")
        client.close()


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[]", {}, "must be a JSON object"),
        (b'{"inputs": 3}', {}, "'inputs' list"),
        (
            b'{"inputs":[{"name":"INPUT0","shape":[1,16],"datatype":"INT32",'
            b'"parameters":{"binary_data_size":64}}]}',
            {"Inference-Header-Content-Length": "101"},
            "expecting 64 bytes",
        ),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "outside the body"),
        (b"{}", {"Inference-Header-Content-Length": "x"}, "not a number"),
        (b"\x00\x01garbage", {"Content-Encoding": "gzip"}, "not valid gzip"),
    ],
    ids=[
        "bad json",
        "not object",
        "inputs type",
        "short binary",
        "header length",
        "header nan",
        "bad gzip",
    ],
)
def test_malformed_http_bodies(
    demo_server: RunningServer, body: bytes, headers: dict[str, str], message: str
) -> None:
    status, error = _post(demo_server, "/v2/models/simple/infer", body, headers)
    assert status == 400
    assert message in error.get("error", "")


def test_unsupported_encoding_and_routes(demo_server: RunningServer) -> None:
    status, body = _post(demo_server, "/v2/models/simple/infer", b"{}", {"Content-Encoding": "br"})
    assert status == 501 and "br" in body["error"]
    status, body = _post(demo_server, "/v2/nothing/here", b"")
    assert status == 404 and body["error"] == "Not Found"
    status, body = _post(demo_server, "/v2/models/simple", b"")
    assert status == 405


def test_gzip_request_body(demo_server: RunningServer) -> None:
    payload = json.dumps({"inputs": [_simple_input(), _simple_input("INPUT1")]}).encode()
    status, body = _post(
        demo_server, "/v2/models/simple/infer", gzip.compress(payload), {"Content-Encoding": "gzip"}
    )
    assert status == 200
    assert body["outputs"][0]["data"] == [2] * 16


def test_server_survives_garbage(demo_server: RunningServer) -> None:
    import socket

    # Raw junk on both ports, then a normal request still works.
    for port in (demo_server.http_port, demo_server.grpc_port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"\x16\x03\x01garbage\r\n\r\n" * 50)
            sock.settimeout(2)
            with contextlib.suppress(OSError):
                sock.recv(100)
    status, _ = _infer_json(demo_server, "simple", [_simple_input(), _simple_input("INPUT1")])
    assert status == 200


def test_failed_model_does_not_stop_others(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "good", identity_config("FP32", [4]))
    write_model(repo, "broken", {"backend": "onnxruntime"}, files={"model.onnx": b"not onnx"})
    write_model(repo, "badyaml", {"backend": "identity", "max_batch_size": -2, "colour": "red"})
    with running_server(tmp_path, repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("good")
        assert not client.is_model_ready("broken")
        assert not client.is_server_ready()  # strict readiness: every model must be ready
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["broken"]["state"] == "UNAVAILABLE"
        assert "broken" in index and index["broken"]["reason"]
        reason = index["badyaml"]["reason"]
        assert (
            "model.yaml" in reason
            and "max_batch_size" in reason
            and "colour: unknown field" in reason
        )
        with pytest.raises(InferenceServerException, match="not ready"):
            client.get_model_metadata("broken")
        log = server.log()
        assert "model 'broken' failed to load" in log
        client.close()
