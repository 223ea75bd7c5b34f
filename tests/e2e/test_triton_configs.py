"""Triton model configs behave as on Triton: backend parameters honoured or reported by name,
and auto-completed batching models get the dynamic batcher."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpc_aio
from conftest import RunningServer, running_server
from helpers import onnx_identity, write_model

ORT_PBTXT = """
backend: "onnxruntime"
max_batch_size: 4
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "inter_op_thread_count" value: { string_value: "1" } }
parameters { key: "intra_op_treads" value: { string_value: "1" } }
optimization { graph { level: 1 } }
"""

# Batches along a dynamic first dim; its first execute blocks until the test opens the gate.
BLOCKER = """
import os


class Model:
    @staticmethod
    def config():
        return {
            "max_batch_size": 8,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [1]}],
        }

    def load(self, config):
        self.started = config.parameters["started"]
        self.gate = config.parameters["gate"]

    def execute(self, inputs):
        x = inputs["INPUT0"]
        if x[0, 0] < 0:
            with open(self.started + ".tmp", "w"):
                pass
            os.rename(self.started + ".tmp", self.started)
            with open(self.gate) as gate:  # a FIFO: returns once the test opens and closes it
                gate.read()
        return {"OUTPUT0": x}
"""


def _get(server: RunningServer, path: str) -> Any:
    with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10) as response:
        return json.loads(response.read())


def _wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _pending(server: RunningServer, model: str) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    pattern = rf'^nv_inference_pending_request_count{{[^}}]*model="{model}"[^}}]*}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


def _open_gate(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # the model has not opened its end yet
            return False
        raise
    os.close(fd)
    return True


def test_triton_ort_parameters_are_read_and_unknown_ones_named(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = write_model(repo, "ort", None, {"model.onnx": onnx_identity(1, ["batch", 2])})
    (model / "config.pbtxt").write_text(ORT_PBTXT)
    with running_server(tmp_path, repo, wait_for="ready") as server:
        config = _get(server, "/v2/models/ort/config")
        log = server.log()
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params["intra_op_thread_count"] == "1"
    assert params["graph_optimization_level"] == "extended"
    # once per load, not once per instance, and naming the key
    assert log.count("unknown parameter(s) intra_op_treads ignored by the onnxruntime") == 1
    assert "intra_op_thread_count" not in log


def test_python_triton_parameter_without_effect_is_explained(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(
        repo,
        "py",
        {"backend": "python", "parameters": {"EXECUTION_ENV_PATH": "$$TRITON_MODEL_DIRECTORY/e"}},
        {"model.py": b"class Model:\n    def execute(self, inputs):\n        return inputs\n"
                     b"    @staticmethod\n    def config():\n        return {'inputs': ["
                     b"{'name': 'I', 'datatype': 'FP32', 'dims': [1]}], 'outputs': ["
                     b"{'name': 'I', 'datatype': 'FP32', 'dims': [1]}]}\n"},
    )  # fmt: skip
    with running_server(tmp_path, repo, wait_for="ready") as server:
        log = server.log()
    assert "parameter EXECUTION_ENV_PATH has no effect" in log


@pytest.mark.parametrize(
    ("given", "batcher"),
    [
        ({}, True),
        ({"max_batch_size": 4}, False),
        ({"dynamic_batching": {"max_queue_delay_us": 7}}, True),
    ],
)
def test_auto_completed_batching_gets_the_dynamic_batcher(
    tmp_path: Path, given: dict[str, Any], batcher: bool
) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "auto", {"backend": "onnxruntime", **given},
                {"model.onnx": onnx_identity(1, ["batch", 2])})  # fmt: skip
    with running_server(tmp_path, repo, wait_for="ready") as server:
        config = _get(server, "/v2/models/auto/config")
    assert config["max_batch_size"] == 4
    assert ("dynamic_batching" in config) is batcher
    if given.get("dynamic_batching"):  # a scheduler the config names is kept as it is
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 7


def test_auto_completed_model_batches_under_concurrency(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    started, gate = tmp_path / "started", tmp_path / "gate"
    os.mkfifo(gate)
    write_model(
        repo,
        "blocker",
        {"backend": "python", "parameters": {"started": str(started), "gate": str(gate)}},
        {"model.py": BLOCKER.encode()},
    )
    n = 8
    with running_server(tmp_path, repo, wait_for="ready") as server:
        assert "dynamic_batching" in _get(server, "/v2/models/blocker/config")

        async def scenario() -> list[Any]:
            client = grpc_aio.InferenceServerClient(server.grpc_url)

            def request(value: float) -> Any:
                inp = grpc_aio.InferInput("INPUT0", [1, 1], "FP32")
                inp.set_data_from_numpy(np.full((1, 1), value, np.float32))
                return client.infer("blocker", [inp])

            try:
                first = asyncio.create_task(request(-1))
                await asyncio.to_thread(_wait_for, started.exists, "the first batch to start")
                rest = [asyncio.create_task(request(i)) for i in range(n)]
                await asyncio.to_thread(
                    _wait_for, lambda: _pending(server, "blocker") == n, f"{n} queued requests"
                )
                await asyncio.to_thread(_wait_for, lambda: _open_gate(gate), "the gate")
                return await asyncio.gather(first, *rest)
            finally:
                await client.close()

        results = asyncio.run(scenario())
        stats = _get(server, "/v2/models/blocker/stats")["model_stats"][0]
    assert [float(r.as_numpy("OUTPUT0")[0, 0]) for r in results] == [-1.0, *range(n)]
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
    assert sizes == {1: 1, n: 1}  # the blocked request alone, then the queue as one batch
