"""Size and concurrency limits on a real server: bodies, inflation, tensor sizes, in-flight
requests, and connections that stall before their headers are complete."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from conftest import RunningServer, running_server
from helpers import identity_config, write_model
from tritonclient.utils import InferenceServerException

from kernelport.errors import ServerError
from kernelport.limits import Limits
from kernelport.protocols.grpc import codec as grpc_codec
from kernelport.protocols.grpc import kernelport_v1
from kernelport.protocols.rest import codec as rest_codec
from kernelport.schema import pb

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def small_limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("limits")
    write_model(tmp / "repo", "echo", identity_config("FP32", [-1]))
    args = ("--max-request-bytes", str(4 * MIB), "--max-inflated-bytes", str(MIB),
            "--max-tensor-elements", "1000", "--http-header-timeout", "0.5",
            "--grpc-max-message-bytes", str(MIB))  # fmt: skip
    with running_server(tmp, tmp / "repo", *args, wait_for="ready") as server:
        yield server


def _post(
    server: RunningServer, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1))


def _infer_body(count: int) -> bytes:
    inputs = [{"name": "INPUT0", "datatype": "FP32", "shape": [count], "data": [0.0] * count}]
    return json.dumps({"inputs": inputs}).encode()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bomb_is_refused_without_inflating(
    small_limits: RunningServer, encoding: str
) -> None:
    # 64 MiB of zeros compresses to ~64 KiB; the limit is 1 MiB.
    zeros = bytes(64 * MIB)
    bomb = gzip.compress(zeros, 9) if encoding == "gzip" else zlib.compress(zeros, 9)
    del zeros
    assert len(bomb) < 128 * 1024
    path = "/v2/models/echo/infer"
    _post(small_limits, path, _infer_body(4), {})  # warm up: first-request allocations
    before = _rss_kib(small_limits.process.pid)
    status, body = _post(small_limits, path, bomb, {"Content-Encoding": encoding})
    grown = _rss_kib(small_limits.process.pid) - before
    assert status == 413
    assert "1048576 bytes" in body["error"] and "--max-inflated-bytes" in body["error"]
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
    # A small compressed body still works.
    ok = gzip.compress(_infer_body(4)) if encoding == "gzip" else zlib.compress(_infer_body(4))
    assert _post(small_limits, path, ok, {"Content-Encoding": encoding})[0] == 200


def test_body_over_limit_by_content_length(small_limits: RunningServer) -> None:
    # Only the headers are sent: the answer comes from Content-Length alone.
    with socket.create_connection(("127.0.0.1", small_limits.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000000\r\nContent-Type: application/json\r\n\r\n"
        )
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 413
        assert "--max-request-bytes" in json.loads(resp.read())["error"]


def test_chunked_body_over_limit_stops_reading(small_limits: RunningServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield bytes(MIB)

    conn = http.client.HTTPConnection("127.0.0.1", small_limits.http_port, timeout=30)
    try:
        conn.request("POST", "/v2/models/echo/infer", chunks(), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413
        assert "4194304 bytes" in json.loads(resp.read())["error"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before the client finishes sending; that is fine too
    finally:
        conn.close()


def test_tensor_element_limit_http_and_grpc(small_limits: RunningServer) -> None:
    status, body = _post(small_limits, "/v2/models/echo/infer", _infer_body(1001), {})
    assert status == 400
    assert "'INPUT0'" in body["error"] and "[1001]" in body["error"]
    assert "1000" in body["error"] and "--max-tensor-elements" in body["error"]
    assert _post(small_limits, "/v2/models/echo/infer", _infer_body(1000), {})[0] == 200

    client = grpcclient.InferenceServerClient(small_limits.grpc_url)
    try:
        inp = grpcclient.InferInput("INPUT0", [1001], "FP32")
        inp.set_data_from_numpy(np.zeros(1001, np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("echo", [inp])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "[1001]" in str(info.value) and "--max-tensor-elements" in str(info.value)
    finally:
        client.close()


def test_grpc_message_over_limit(small_limits: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(small_limits.grpc_url)
    try:
        inp = grpcclient.InferInput("INPUT0", [2 * MIB // 4], "FP32")
        inp.set_data_from_numpy(np.zeros(2 * MIB // 4, np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("echo", [inp])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        client.close()


def test_overflowing_shape_is_invalid(small_limits: RunningServer) -> None:
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [0, 2**40, 2**40],
                        "data": []}]}  # fmt: skip
    status, reply = _post(small_limits, "/v2/models/echo/infer", json.dumps(body).encode(), {})
    assert status == 400
    assert "overflows" in reply["error"] and "'INPUT0'" in reply["error"]


# --- every codec checks the limit where it parses shapes (unit level) -----------------------


def _grpc_request(shape: list[int], typed: bool) -> Any:
    msg = pb.inference.ModelInferRequest(model_name="echo")
    tensor = msg.inputs.add(name="INPUT0", datatype="FP32", shape=shape)
    if typed:
        tensor.contents.fp32_contents.extend([])
    else:
        msg.raw_input_contents.append(b"")
    return msg


def _kernelport_v1(shape: list[int]) -> Any:
    msg = pb.kernelport_v1.InferRequest(model="echo")
    msg.inputs.add(name="INPUT0", dtype=pb.kernelport_v1.DType.Value("F32"), shape=shape)
    return msg


def _http(shape: list[int], limits: Limits, binary: bool) -> Any:
    tensor: dict[str, Any] = {"name": "INPUT0", "datatype": "FP32", "shape": shape}
    if binary:
        tensor["parameters"] = {"binary_data_size": 0}
    else:
        tensor["data"] = []
    body = json.dumps({"inputs": [tensor]}).encode()
    return rest_codec.decode_request(body, None, "echo", "", limits)


DECODERS: dict[str, Callable[[list[int], Limits], Any]] = {
    "http json": lambda shape, lim: _http(shape, lim, binary=False),
    "http binary": lambda shape, lim: _http(shape, lim, binary=True),
    "grpc raw": lambda shape, lim: grpc_codec.decode_request(_grpc_request(shape, False), lim),
    "grpc typed": lambda shape, lim: grpc_codec.decode_request(_grpc_request(shape, True), lim),
    "kernelport.v1": lambda shape, lim: kernelport_v1.decode(_kernelport_v1(shape), lim),
}


@pytest.mark.parametrize("wire", sorted(DECODERS))
def test_every_codec_checks_shapes_before_allocating(wire: str) -> None:
    decode = DECODERS[wire]
    limits = Limits(max_tensor_elements=1000)
    with pytest.raises(ServerError, match=r"'INPUT0'.*\[10, 101\].*1010 elements.*1000"):
        decode([10, 101], limits)
    # int64 wrap-around (np.prod gives 0 here) must not slip through to numpy
    with pytest.raises(ServerError, match=r"'INPUT0'.*overflows"):
        decode([2**32, 2**32, 0], limits)
    assert decode([0, 4], limits).inputs[0].shape == (0, 4)


# --- in-flight cap ---------------------------------------------------------------------------

BLOCKING = """
import os

class Model:
    def load(self, config):
        self.release = config.parameters["release"]

    def execute(self, inputs):
        # A FIFO: one byte per execution, blocking until the test writes it.
        fd = os.open(self.release, os.O_RDONLY)
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)
        return {"Y": inputs["X"]}
"""


def _python_model(repo: Path, name: str, source: str, **parameters: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(source)
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "inputs": [{"name": "X", "datatype": "FP32", "dims": [2]}],
        "outputs": [{"name": "Y", "datatype": "FP32", "dims": [2]}],
        "parameters": parameters,
    }
    (repo / name / "model.yaml").write_text(yaml.safe_dump(config))


def _in_flight(server: RunningServer) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r"^kernelport_requests_in_flight (\S+)$", text, re.M)
    assert match is not None
    return float(match.group(1))


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _release(fifo: Path, count: int, done: threading.Event) -> None:
    # Held open until the test is done, so the bytes outlive each reader's close.
    with open(fifo, "wb", buffering=0) as f:  # blocks until the model opens the FIFO
        f.write(b"x" * count)
        done.wait(60)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_in_flight_cap(tmp_path: Path, protocol: str) -> None:
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    _python_model(tmp_path / "repo", "gate", BLOCKING, release=str(fifo))
    x = np.array([1.0, 2.0], np.float32)
    with running_server(tmp_path, tmp_path / "repo", "--max-in-flight", "2") as server:
        results: list[Any] = []

        def infer() -> None:
            with urllib.request.urlopen(
                urllib.request.Request(
                    f"http://{server.http_url}/v2/models/gate/infer", _json_x(x)
                ),
                timeout=60,
            ) as resp:
                results.append(json.loads(resp.read())["outputs"][0]["data"])

        callers = [threading.Thread(target=infer) for _ in range(2)]
        for t in callers:
            t.start()
        _wait(lambda: _in_flight(server) == 2, "two requests in flight")
        if protocol == "http":
            status, body = _post(server, "/v2/models/gate/infer", _json_x(x), {})
            assert status == 503
            message = body["error"]
        else:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            inp = grpcclient.InferInput("X", [2], "FP32")
            inp.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException) as info:
                client.infer("gate", [inp])
            client.close()
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            message = str(info.value)
        assert "2 inference requests in flight" in message and "--max-in-flight" in message
        done = threading.Event()
        threading.Thread(target=_release, args=(fifo, 2, done), daemon=True).start()
        for t in callers:
            t.join(30)
        done.set()
        assert results == [[1.0, 2.0], [1.0, 2.0]]


def _json_x(x: np.ndarray[Any, Any]) -> bytes:
    inputs = [{"name": "X", "datatype": "FP32", "shape": [2], "data": x.tolist()}]
    return json.dumps({"inputs": inputs}).encode()


# --- connections that stall before their headers are complete ---------------------------------


def _closed_by_server(port: int, sent: bytes) -> float:
    """Send a partial request, then read until the server closes; return the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(sent)
        while sock.recv(4096):
            pass  # nothing is expected, but read whatever comes until EOF
    return time.monotonic() - started


@pytest.mark.parametrize("port", ["http_port", "metrics_port"])
@pytest.mark.parametrize("partial", [b"", b"GET /v2/hea", b"GET /v2/health/live HTTP/1.1\r\nHo"])
def test_stalled_headers_are_closed(small_limits: RunningServer, port: str, partial: bytes) -> None:
    took = _closed_by_server(getattr(small_limits, port), partial)
    assert 0.4 < took < 25  # closed by the 0.5 s header timeout, long before the socket's


def test_keep_alive_connection_then_stalled_request(small_limits: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", small_limits.http_port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")  # the next request stalls
        while sock.recv(4096):
            pass  # EOF: the server closed it after the header timeout


def test_grpc_connection_without_handshake_is_closed(small_limits: RunningServer) -> None:
    assert 0.4 < _closed_by_server(small_limits.grpc_port, b"") < 25
