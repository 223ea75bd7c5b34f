"""tritonclient's system shared-memory utilities against a model in a worker process: the
worker reads the inputs from its own mapping of the client's region (no copy in the server),
over HTTP and gRPC, and drops the mapping when the region is unregistered."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from conftest import RunningServer, running_server
from helpers import worker_pids, write_model

ROWS, COLS = 8, 1024  # 32 KiB a request
MODEL = """
class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"] * 2}
"""
_names = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("shm_workers")
    config = {
        "backend": "python",
        "max_batch_size": ROWS,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [COLS]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [COLS]}],
        "execution": {"mode": "worker"},
    }
    write_model(repo, "twice", config, {"model.py": MODEL.encode()})
    with running_server(tmp_path_factory.mktemp("run"), repo, wait_for="ready") as running:
        yield running


def _maps(pid: int, key: str) -> bool:
    return f"/dev/shm/{key}" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inputs_in_a_region_are_read_by_the_worker(server: RunningServer, protocol: str) -> None:
    module: Any = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(
        server.http_url if protocol == "http" else server.grpc_url
    )
    name = f"kp_zc_{os.getpid()}_{next(_names)}"
    x = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
    size = 2 * x.nbytes
    handle = shm.create_shared_memory_region(name, "/" + name, size)
    try:
        shm.set_shared_memory_region(handle, [x, x + 1])
        client.register_system_shared_memory(name, "/" + name, size)
        for offset, expected in ((0, x * 2), (x.nbytes, (x + 1) * 2)):
            tensor = module.InferInput("INPUT0", [ROWS, COLS], "FP32")
            tensor.set_shared_memory(name, x.nbytes, offset)
            answer = client.infer("twice", [tensor]).as_numpy("OUTPUT0")
            np.testing.assert_array_equal(answer, expected)
        [worker] = worker_pids(server.process.pid)
        assert _maps(worker, name)  # the worker mapped the client's region itself
        client.unregister_system_shared_memory(name)
        plain = module.InferInput("INPUT0", [ROWS, COLS], "FP32")
        plain.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("twice", [plain]).as_numpy("OUTPUT0"), x * 2)
        # The FORGET went out before that request's batch, and the worker reads in order.
        assert not _maps(worker, name)
    finally:
        client.unregister_system_shared_memory()
        client.close()
        shm.destroy_shared_memory_region(handle)
