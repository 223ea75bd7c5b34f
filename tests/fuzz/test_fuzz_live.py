"""Fuzzing a live server: REST and gRPC requests, repository calls and odd paths.

Every client mistake must get a 4xx / INVALID_ARGUMENT-class answer: no 500, no INTERNAL, no
crash and no hang, nothing written or deleted outside the repository, and the server still
answers a good request after each example. Budgets: see conftest.py (``make fuzz`` for more).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fuzz_settings  # noqa: F401  (loads the hypothesis profile)
import grpc
import numpy as np
import pytest
import tritonclient.grpc.service_pb2 as service
import tritonclient.grpc.service_pb2_grpc as service_grpc
from conftest import RunningServer, running_server
from helpers import identity_config, onnx_identity, write_model
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    DATATYPES,
    HOSTILE_NAMES,
    INPUT_NAMES,
    load_parameters,
    rest_infer_body,
)

from kernelport.schema import pb

MODELS = ["fp32", "bytes", "int32", "onnx"]
HTTP_OK = {200, 400, 403, 404, 405, 413, 501, 503, 504}
GRPC_BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

model_names = st.sampled_from(MODELS + HOSTILE_NAMES + ["nope"]) | st.text(max_size=12)
versions = st.sampled_from(["", "1", "2", "01", "\u0661", "-1", "99999999999999999999", "x"])


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    from onnx import TensorProto

    root = tmp_path_factory.mktemp("fuzz")
    repo = root / "repo"
    write_model(
        repo,
        "fp32",
        identity_config(
            "FP32", [4], max_batch_size=8, dynamic_batching={"max_queue_delay_us": 100}
        ),
    )
    write_model(repo, "bytes", identity_config("BYTES", [-1]))
    write_model(repo, "int32", identity_config("INT32", [2, 2]))
    write_model(repo, "onnx", None, {"model.onnx": onnx_identity(TensorProto.FLOAT, ["N", 4])})
    victim = root / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("do not delete")
    server_tmp = root / "server-tmp"  # the server's own temporary space (staged uploads)
    server_tmp.mkdir()
    args = ("--model-control-mode", "explicit", "--load-model", "*", "--allow-model-upload")
    with running_server(
        root, repo, *args, env={"TMPDIR": str(server_tmp)}, wait_for="ready"
    ) as server:
        yield server, root


def _entries(root: Path) -> set[str]:
    """Everything under the fuzz root, except the server's own temp space and log files."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] == "server-tmp":
            dirnames[:] = []
            continue
        found.update(os.path.join(rel, n) for n in dirnames + filenames)
    return found


def _http(
    server: RunningServer,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        # UTF-8 bytes: a client may send any octets in a header value
        raw_headers = {k: v.encode() for k, v in (headers or {}).items()}
        conn.request(method, path, body=body, headers=raw_headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _check_http(status: int, body: bytes, what: str) -> None:
    assert status in HTTP_OK, f"{what}: HTTP {status} {body[:300]!r}"
    if status >= 400 and body:
        error = json.loads(body)
        assert isinstance(error.get("error"), str) and error["error"], (what, body[:300])


def _still_serving(server: RunningServer) -> None:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [2, 4], "data": data.ravel().tolist()}
        ]
    }
    status, raw = _http(server, "POST", "/v2/models/fp32/infer", json.dumps(body).encode())
    assert status == 200, raw
    assert json.loads(raw)["outputs"][0]["data"] == data.ravel().tolist()


def _path(name: str, version: str, verb: str) -> str:
    quoted = urllib.parse.quote(name, safe="")
    path = f"/v2/models/{quoted}"
    if version:
        path += f"/versions/{urllib.parse.quote(version, safe='')}"
    return path + (f"/{verb}" if verb else "")


@given(name=model_names, version=versions, request=rest_infer_body())
def test_http_infer(
    fuzz_env: tuple[RunningServer, Path],
    name: str,
    version: str,
    request: tuple[bytes, dict[str, str]],
) -> None:
    server, _ = fuzz_env
    body, headers = request
    status, raw = _http(server, "POST", _path(name, version, "infer"), body, headers)
    _check_http(status, raw, f"infer {name!r} {body[:200]!r} {headers}")
    _still_serving(server)


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]),
    name=model_names,
    version=versions,
    verb=st.sampled_from(["", "ready", "config", "stats", "trace/setting", "infer", "x"]),
    raw_segment=st.sampled_from(["%2e%2e", "%2E%2e/%2e%2e", "..%2f..", "%00", "%ff", "//", ""]),
)
def test_http_paths(
    fuzz_env: tuple[RunningServer, Path],
    method: str,
    name: str,
    version: str,
    verb: str,
    raw_segment: str,
) -> None:
    server, root = fuzz_env
    before = _entries(root)
    for path in (
        _path(name, version, verb),
        f"/v2/models/{raw_segment}/{verb}",
        f"/v2/repository/models/{raw_segment}/load",
    ):
        status, raw = _http(server, method, path, b"{}" if method in ("POST", "PUT") else b"")
        _check_http(status, raw if method != "HEAD" else b"", f"{method} {path}")
    assert _entries(root) == before
    _still_serving(server)


@given(
    name=st.sampled_from([*HOSTILE_NAMES, "new_model"]) | st.text(max_size=12),
    params=load_parameters(),
    verb=st.sampled_from(["load", "unload"]),
)
def test_http_repository(
    fuzz_env: tuple[RunningServer, Path], name: str, params: dict[str, Any], verb: str
) -> None:
    server, root = fuzz_env
    if name in MODELS:
        return  # the fixture's own models must keep serving
    before = _entries(root)
    quoted = urllib.parse.quote(name, safe="")
    body = json.dumps({"parameters": params}).encode()
    status, raw = _http(server, "POST", f"/v2/repository/models/{quoted}/{verb}", body)
    _check_http(status, raw, f"{verb} {name!r} {params}")
    assert _entries(root) == before, "the repository API wrote or deleted outside its space"
    assert (root / "victim" / "keep.txt").read_text() == "do not delete"
    _still_serving(server)


# --- gRPC ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(fuzz_env: tuple[RunningServer, Path]) -> Iterator[grpc.Channel]:
    server, _ = fuzz_env
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    with grpc.insecure_channel(server.grpc_url, options=options) as chan:
        yield chan


def _check_grpc(error: grpc.RpcError, what: str) -> None:
    code = error.code()
    assert code not in GRPC_BAD, f"{what}: {code} {error.details()}"
    # a server-side deadline names its reason; the client's own timeout would mean a hang
    assert not (
        code is grpc.StatusCode.DEADLINE_EXCEEDED and error.details() == "Deadline Exceeded"
    ), what


def _param(value: Any) -> service.InferParameter:
    if isinstance(value, bool):
        return service.InferParameter(bool_param=value)
    if isinstance(value, int):
        return service.InferParameter(int64_param=max(min(value, 2**63 - 1), -(2**63)))
    if isinstance(value, float):
        return service.InferParameter(double_param=value)
    return service.InferParameter(string_param=str(value))


TYPED_CONTENTS: dict[str, st.SearchStrategy[Any]] = {
    "fp32_contents": st.floats(width=32),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "bool_contents": st.booleans(),
    "bytes_contents": st.binary(max_size=8),
}


@st.composite
def grpc_infer_request(draw: st.DrawFn) -> service.ModelInferRequest:
    msg = service.ModelInferRequest(
        model_name=draw(model_names), model_version=draw(versions), id=draw(st.text(max_size=8))
    )
    for key in draw(
        st.lists(
            st.sampled_from(["timeout", "priority", "binary_data_output", "x"]),
            max_size=2,
            unique=True,
        )
    ):
        value = draw(
            st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=4) | st.booleans()
        )
        msg.parameters[key].CopyFrom(_param(value))
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = msg.inputs.add(
            name=draw(st.sampled_from(INPUT_NAMES)),
            datatype=draw(st.sampled_from(DATATYPES) | st.text(max_size=4)),
            shape=draw(
                st.lists(
                    st.integers(0, 4) | st.sampled_from([-1, 2**31, 2**62, 2**63 - 1, -(2**63)]),
                    max_size=4,
                )
            ),
        )
        if use_raw:
            msg.raw_input_contents.append(draw(st.binary(max_size=96)))
        elif draw(st.booleans()):
            field, values = draw(st.sampled_from(list(TYPED_CONTENTS.items())))
            getattr(tensor.contents, field).extend(draw(st.lists(values, max_size=20)))
    if draw(st.booleans()):
        msg.raw_input_contents.append(draw(st.binary(max_size=16)))  # one too many, sometimes
    return msg


def _grpc_still_serving(chan: grpc.Channel) -> None:
    stub = service_grpc.GRPCInferenceServiceStub(chan)
    data = np.arange(4, dtype=np.float32).reshape(1, 4)
    msg = service.ModelInferRequest(model_name="onnx")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    msg.raw_input_contents.append(data.tobytes())
    out = stub.ModelInfer(msg, timeout=30)
    assert np.frombuffer(out.raw_output_contents[0], np.float32).tolist() == data.ravel().tolist()


@given(request=grpc_infer_request())
def test_grpc_infer(channel: grpc.Channel, request: service.ModelInferRequest) -> None:
    stub = service_grpc.GRPCInferenceServiceStub(channel)
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        _check_grpc(error, str(request)[:500])
    _grpc_still_serving(channel)


@given(requests=st.lists(grpc_infer_request(), min_size=1, max_size=4))
def test_grpc_stream(channel: grpc.Channel, requests: list[service.ModelInferRequest]) -> None:
    stub = service_grpc.GRPCInferenceServiceStub(channel)
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert len(answers) == len(requests)  # one answer (result or error) per request, no hang
    _grpc_still_serving(channel)


@given(
    name=st.sampled_from([*HOSTILE_NAMES, "new_model"]) | st.text(max_size=12),
    params=load_parameters(),
    verb=st.sampled_from(["load", "unload"]),
)
def test_grpc_repository(
    fuzz_env: tuple[RunningServer, Path],
    channel: grpc.Channel,
    name: str,
    params: dict[str, Any],
    verb: str,
) -> None:
    _, root = fuzz_env
    if name in MODELS:
        return
    before = _entries(root)
    stub = service_grpc.GRPCInferenceServiceStub(channel)
    try:
        if verb == "load":
            msg = service.RepositoryModelLoadRequest(model_name=name)
            for key, value in params.items():
                if key.startswith("file:") and isinstance(value, str):
                    try:
                        msg.parameters[key].bytes_param = base64.b64decode(value)
                    except ValueError:
                        msg.parameters[key].string_param = value
                else:
                    text = value if isinstance(value, str) else json.dumps(value)
                    msg.parameters[key].string_param = text
            stub.RepositoryModelLoad(msg, timeout=30)
        else:
            stub.RepositoryModelUnload(
                service.RepositoryModelUnloadRequest(model_name=name), timeout=30
            )
    except grpc.RpcError as error:
        _check_grpc(error, f"{verb} {name!r} {params}")
    assert _entries(root) == before, "the repository API wrote or deleted outside its space"
    assert (root / "victim" / "keep.txt").read_text() == "do not delete"
    _grpc_still_serving(channel)


@given(
    model=model_names,
    tensors=st.lists(
        st.tuples(
            st.sampled_from(INPUT_NAMES),
            st.integers(0, 16),
            st.lists(st.integers(-2, 4) | st.sampled_from([2**62, -(2**63)]), max_size=3),
            st.binary(max_size=64),
        ),
        max_size=3,
    ),
)
def test_kernelport_v1_infer(
    channel: grpc.Channel, model: str, tensors: list[tuple[str, int, list[int], bytes]]
) -> None:
    infer = channel.unary_unary(
        "/kernelport.v1.InferenceService/Infer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda raw: raw,
    )
    msg = pb.kernelport_v1.InferRequest(model=model)
    for name, dtype, shape, data in tensors:
        msg.inputs.add(name=name, dtype=dtype, shape=shape, data=data)
    try:
        infer(msg, timeout=30)
    except grpc.RpcError as error:
        _check_grpc(error, str(msg)[:500])
    _grpc_still_serving(channel)
