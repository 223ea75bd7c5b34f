"""Models in worker processes (execution mode ``worker``): served, crashed, stuck, stopped.

Real servers and real worker processes. Waits poll a condition against a deadline, as the
server fixtures do, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import client_for, process_alive, worker_pids, write_model
from tritonclient.utils import InferenceServerException

from kernelport.config import demo_repository

ECHO = """
import os
import threading


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        if x.size and x.flat[0] == -1:
            {poison}
        return {{"OUTPUT0": x * 2}}
"""
HOOKED = """
class Model:
    def preprocess(self, inputs):
        return inputs

    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"]}
"""


def _python_model(
    repo: Path, name: str, source: str, execution: dict[str, Any] | None = None
) -> None:
    config: dict[str, Any] = {
        "backend": "python",
        "max_batch_size": 8,
        "dynamic_batching": {},
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
    }
    if execution is not None:
        config["execution"] = execution
    write_model(repo, name, config, {"model.py": source.encode()})


def _mlp(repo: Path, name: str, mode: str) -> None:
    shutil.copytree(demo_repository() / "mlp", repo / name)
    with open(repo / name / "model.yaml", "a") as f:
        f.write(f"execution:\n  mode: {mode}\n")


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until true; the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def _infer(client: Any, protocol: str, model: str, x: np.ndarray[Any, Any]) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module  # type: ignore[no-redef]
    tensor = module.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy("OUTPUT0")


def _answers(server: RunningServer, model: str) -> bool:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        x = np.ones((1, 4), np.float32)
        return bool(np.array_equal(_infer(client, "http", model, x), x * 2))
    except InferenceServerException:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("workers")
    worker = {"mode": "worker"}
    _python_model(repo, "echo", ECHO.format(poison="os.abort()"), worker)
    _python_model(repo, "steady", ECHO.format(poison="pass"), {"mode": "in_process"})
    _python_model(repo, "steady_worker", ECHO.format(poison="pass"), worker)
    forever = "threading.Event().wait()"
    _python_model(repo, "hang", ECHO.format(poison=forever), {"mode": "worker", "timeout_s": 1})
    _python_model(repo, "hooked", HOOKED, worker)
    _python_model(repo, "pair", ECHO.format(poison="pass"), worker)
    with open(repo / "pair" / "model.yaml", "a") as f:
        f.write("instance_count: 2\n")
    _mlp(repo, "mlp_worker", "worker")
    _mlp(repo, "mlp_local", "in_process")
    with running_server(tmp_path_factory.mktemp("log"), repo) as running:
        for model in ("echo", "steady", "hang", "pair", "mlp_worker", "mlp_local"):
            _wait_for(lambda m=model: _answers_or_ready(running, m), 60, f"{model} ready")
        yield running


def _answers_or_ready(server: RunningServer, model: str) -> bool:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return bool(client.is_model_ready(model))
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_python_model_in_a_worker_answers(server: RunningServer, protocol: str) -> None:
    client = client_for(protocol, server)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_infer(client, protocol, "echo", x), x * 2)


def test_concurrent_requests_each_get_their_own_rows(server: RunningServer) -> None:
    """Two instances in one worker process, batches in flight at once, inputs and outputs
    sharing one arena: every caller gets exactly its own answer."""
    wrong: list[int] = []

    def call(i: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        for j in range(20):
            x = np.full((1 + (i + j) % 3, 4), i * 100 + j, np.float32)
            if not np.array_equal(_infer(client, "http", "pair", x), x * 2):
                wrong.append(i)
        client.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_onnx_in_a_worker_gives_the_in_process_outputs(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    outputs = {}
    for model in ("mlp_worker", "mlp_local"):
        tensor = httpclient.InferInput("INPUT0", [5, 64], "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        outputs[model] = client.infer(model, [tensor]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(outputs["mlp_worker"], outputs["mlp_local"])


def test_hooks_in_worker_mode_are_refused_clearly(server: RunningServer) -> None:
    with urllib.request.urlopen(
        urllib.request.Request(
            f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST"
        )
    ) as resp:
        index = {e["name"]: e for e in json.loads(resp.read())}
    assert index["hooked"]["state"] == "UNAVAILABLE"
    assert "not supported with execution mode 'worker'" in index["hooked"]["reason"]


def test_a_crashing_worker_fails_only_its_request_and_comes_back(
    server: RunningServer,
) -> None:
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    served = {"steady": 0, "steady_worker": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def load(model: str) -> None:  # another model, hammered throughout the crash
        client = httpclient.InferenceServerClient(server.http_url)
        x = np.ones((1, 4), np.float32)
        while not stop.is_set():
            try:
                ok = np.array_equal(_infer(client, "http", model, x), x * 2)
            except InferenceServerException as exc:
                ok = False
                errors.append(str(exc))
            with lock:
                counts["ok" if ok else "failed"] += 1
                served[model] += ok
        client.close()

    # two threads on a model in process, two on one in a worker process of its own
    models = ["steady", "steady_worker"] * 2
    threads = [threading.Thread(target=load, args=(m,)) for m in models]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: min(served.values()) >= 10, 30, "load on both other models")
        client = httpclient.InferenceServerClient(server.http_url)
        poison = np.full((1, 4), -1, np.float32)
        with pytest.raises(InferenceServerException, match=r"worker died \(signal SIGABRT\)"):
            _infer(client, "http", "echo", poison)
        back = _wait_for(lambda: _answers(server, "echo"), 5, "echo serving again")
        before = dict(served)
        _wait_for(
            lambda: all(served[m] >= before[m] + 10 for m in served),
            30,
            "more load on both after the restart",
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert counts["failed"] == 0, errors[:3]
    assert back < 5
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as resp:
        metrics = resp.read().decode()
    assert 'kernelport_worker_restarts_total{model="echo",version="1"} 1\n' in metrics
    assert "model 'echo' worker restarted" in server.log()


def test_a_stuck_batch_gets_an_error_and_its_worker_is_replaced(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="execution timeout of 1s") as caught:
        _infer(client, "http", "hang", np.full((1, 4), -1, np.float32))
    assert caught.value.status() == "504"  # DEADLINE_EXCEEDED
    assert time.monotonic() - started < 20
    _wait_for(lambda: _answers(server, "hang"), 10, "hang serving again")


def test_no_process_or_shared_memory_name_outlives_the_server(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "plain", ECHO.format(poison="pass"))  # worker by the server default
    shm_before = set(os.listdir("/dev/shm"))
    with running_server(tmp_path, repo, "--model-execution", "worker") as server:
        _wait_for(lambda: _answers(server, "plain"), 60, "plain serving")
        [first] = worker_pids(server.process.pid)
        maps = Path(f"/proc/{first}/maps").read_text()
        assert "/memfd:kernelport-arena" in maps
        assert "/dev/shm/" not in maps
        os.kill(first, signal.SIGKILL)
        _wait_for(lambda: worker_pids(server.process.pid) - {first} != set(), 10, "a new worker")
        [second] = worker_pids(server.process.pid) - {first}
        _wait_for(lambda: _answers(server, "plain"), 10, "plain serving again")
        assert server.stop() == 0
    assert not process_alive(first)
    _wait_for(lambda: not process_alive(second), 10, "the worker gone with its server")
    assert {n for n in set(os.listdir("/dev/shm")) - shm_before if "kernelport" in n} == set()


def test_a_worker_exits_when_its_server_is_killed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "plain", ECHO.format(poison="pass"), {"mode": "worker"})
    with running_server(tmp_path, repo) as server:
        _wait_for(lambda: _answers(server, "plain"), 60, "plain serving")
        [worker] = worker_pids(server.process.pid)
        server.stop(signal.SIGKILL)
    _wait_for(lambda: not process_alive(worker), 10, "the orphaned worker gone")
