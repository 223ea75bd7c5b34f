"""Soak: 5,000 mixed good and bad requests over HTTP and gRPC leave the server's memory and
open file descriptors where they started."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, onnx_identity, write_model
from tritonclient.utils import InferenceServerException

REQUESTS = int(os.environ.get("KERNELPORT_SOAK_REQUESTS", 5000))
WARMUP = 1000
RSS_SLACK_BYTES = 50 * 2**20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Mix:
    """A fixed rotation of good and bad requests; each call checks its own answer."""

    def __init__(self, server: RunningServer) -> None:
        self.http = httpclient.InferenceServerClient(server.http_url)
        self.grpc = grpcclient.InferenceServerClient(server.grpc_url)
        self.raw = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        self.data = np.random.default_rng(0).random((2, 4), dtype=np.float32)
        self.kinds: list[Callable[[], None]] = [
            self.http_good, self.grpc_good, self.http_bad_json, self.grpc_bad_shape,
            self.http_good_json, self.http_unknown_model, self.grpc_unknown_model,
            self.http_bad_binary, self.http_bad_gzip, self.grpc_good_bytes, self.http_wrong_dtype,
        ]  # fmt: skip

    def close(self) -> None:
        self.http.close()
        self.grpc.close()
        self.raw.close()

    def _post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        try:
            self.raw.request("POST", path, body, headers or {})
            resp = self.raw.getresponse()
        except (http.client.HTTPException, OSError):
            self.raw.close()  # the server may close after an error: reconnect once
            self.raw.request("POST", path, body, headers or {})
            resp = self.raw.getresponse()
        resp.read()
        return resp.status

    def _inputs(self, module: object) -> list[object]:
        tensor = module.InferInput("INPUT0", [2, 4], "FP32")  # type: ignore[attr-defined]
        tensor.set_data_from_numpy(self.data)
        return [tensor]

    def http_good(self) -> None:
        out = self.http.infer("onnx", self._inputs(httpclient)).as_numpy("OUTPUT0")
        assert np.array_equal(out, self.data)

    def grpc_good(self) -> None:
        out = self.grpc.infer("onnx", self._inputs(grpcclient)).as_numpy("OUTPUT0")
        assert np.array_equal(out, self.data)

    def grpc_good_bytes(self) -> None:
        tensor = grpcclient.InferInput("INPUT0", [3], "BYTES")
        tensor.set_data_from_numpy(np.array([b"a", b"bc", b""], dtype=np.object_))
        out = self.grpc.infer("bytes", [tensor]).as_numpy("OUTPUT0")
        assert out.tolist() == [b"a", b"bc", b""]

    def http_good_json(self) -> None:
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 4],
                            "data": self.data.ravel().tolist()}]}  # fmt: skip
        assert self._post("/v2/models/onnx/infer", json.dumps(body).encode()) == 200

    def http_bad_json(self) -> None:
        assert self._post("/v2/models/onnx/infer", b'{"inputs": [') == 400

    def http_unknown_model(self) -> None:
        assert self._post("/v2/models/nope/infer", b'{"inputs": []}') == 404

    def http_wrong_dtype(self) -> None:
        body = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 4],
                            "data": [1, 2, 3, 4]}]}  # fmt: skip
        assert self._post("/v2/models/onnx/infer", json.dumps(body).encode()) == 400

    def http_bad_binary(self) -> None:
        declared = {"name": "INPUT0", "datatype": "FP32", "shape": [2, 4],
                    "parameters": {"binary_data_size": 32}}  # fmt: skip
        header = json.dumps({"inputs": [declared]}).encode()
        body = header + b"\0" * 16  # half the bytes it declares
        status = self._post("/v2/models/onnx/infer", body,
                            {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
        assert status == 400

    def http_bad_gzip(self) -> None:
        body = gzip.compress(b'{"inputs": []}')[:-6]  # truncated stream
        assert self._post("/v2/models/onnx/infer", body, {"Content-Encoding": "gzip"}) == 400

    def grpc_bad_shape(self) -> None:
        tensor = grpcclient.InferInput("INPUT0", [2, 3], "FP32")
        tensor.set_data_from_numpy(np.zeros((2, 3), np.float32))
        with pytest.raises(InferenceServerException, match="shape"):
            self.grpc.infer("onnx", [tensor])

    def grpc_unknown_model(self) -> None:
        with pytest.raises(InferenceServerException, match="not found"):
            self.grpc.infer("nope", self._inputs(grpcclient))

    def run(self, count: int) -> None:
        for i in range(count):
            self.kinds[i % len(self.kinds)]()


def _settle(read: Callable[[], int], want: int, timeout: float = 15.0) -> int:
    """Poll until ``read()`` is at most ``want`` (sockets close asynchronously)."""
    deadline = time.monotonic() + timeout
    value = read()
    while value > want and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def test_soak_memory_and_descriptors(tmp_path: Path) -> None:
    from onnx import TensorProto

    repo = tmp_path / "repo"
    write_model(repo, "onnx", None, {"model.onnx": onnx_identity(TensorProto.FLOAT, ["N", 4])})
    write_model(repo, "bytes", identity_config("BYTES", [-1]))
    with running_server(tmp_path, repo, wait_for="ready") as server:
        pid = server.process.pid
        fds_before = _fds(pid)
        mix = Mix(server)
        try:
            mix.run(WARMUP)  # allocator pools, caches and the clients' connections settle
            rss_before = _rss(pid)
            mix.run(REQUESTS)
            grown = _rss(pid) - rss_before
        finally:
            mix.close()
        assert grown < RSS_SLACK_BYTES, f"RSS grew by {grown / 2**20:.1f} MiB over {REQUESTS}"
        fds_after = _settle(lambda: _fds(pid), fds_before)
        assert fds_after <= fds_before, f"open descriptors {fds_before} -> {fds_after}"
