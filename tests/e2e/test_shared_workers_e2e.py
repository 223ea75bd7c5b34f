"""``--frontends 2`` with a worker-mode model: one worker process for both front ends.

Real CLI, real tritonclient over HTTP and gRPC. The model answers with its process id, so
every response says which worker ran it; each front end's metrics port says which worker it
is attached to (``kernelport_worker_pid``) and how often it lost it. Waits poll a condition
against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import children, process_alive, write_model
from test_frontends import _frontends
from tritonclient.utils import InferenceServerException

MODEL = """
import os
import time
from pathlib import Path

import numpy as np


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        if (x == -2).any():
            Path(os.environ["KP_TEST_MARK"]).write_text("running")
            time.sleep(3600)
        pid = np.full((x.shape[0], 1), os.getpid(), np.int64)
        return {"OUTPUT0": x * 2, "PID": pid}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    repo = tmp_path / "repo"
    config = {
        "backend": "python",
        "max_batch_size": 8,
        "dynamic_batching": {},
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
        "outputs": [
            {"name": "OUTPUT0", "datatype": "FP32", "dims": [4]},
            {"name": "PID", "datatype": "INT64", "dims": [1]},
        ],
        "execution": {"mode": "worker"},
    }
    write_model(repo, "pid", config, {"model.py": MODEL.encode()})
    env = {"KP_TEST_MARK": str(tmp_path / "mark")}
    with running_server(
        tmp_path, repo, "--frontends", "2", env=env, wait_for="ready", timeout=120
    ) as running:
        yield running


def _ask(server: RunningServer, protocol: str, value: float = 1.0) -> int:
    """One request on a new connection (so the kernel picks a front end): the worker's pid."""
    module: Any = httpclient if protocol == "http" else grpcclient
    url = server.http_url if protocol == "http" else server.grpc_url
    client = module.InferenceServerClient(url)
    try:
        x = np.full((1, 4), value, np.float32)
        tensor = module.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("pid", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
        return int(result.as_numpy("PID")[0, 0])
    finally:
        client.close()


def _metrics_ports(server: RunningServer) -> list[int]:
    found = re.search(r"front ends listening: .* metrics \[([\d, ]+)\]", server.log())
    assert found, server.log()
    return [int(p) for p in found[1].split(",")]


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    found = re.findall(rf'^{name}\{{model="pid",version="1"\}} (\S+)$', text, re.M)
    return float(found[0]) if found else None


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.02)


class _Load:
    """Requests from a few threads over both protocols until stopped; every outcome kept."""

    def __init__(self, server: RunningServer) -> None:
        self.outcomes: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(server, protocol))
            for protocol in ("http", "grpc", "http", "grpc")
        ]

    def _run(self, server: RunningServer, protocol: str) -> None:
        while not self._stop.is_set():
            try:
                self.outcomes.append(f"ok {_ask(server, protocol)}")
            except InferenceServerException as exc:
                self.outcomes.append(f"{exc.status()} {exc.message()}")

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def test_both_front_ends_send_their_batches_to_one_worker(server: RunningServer) -> None:
    metrics = _metrics_ports(server)
    pids = {_ask(server, "http") for _ in range(40)} | {_ask(server, "grpc") for _ in range(20)}
    assert len(pids) == 1, pids
    [pid] = pids
    served = [_metric(port, "nv_inference_request_success") or 0 for port in metrics]
    assert sum(served) == 60 and all(n > 0 for n in served), served  # both front ends answered
    assert [_metric(port, "kernelport_worker_pid") for port in metrics] == [pid, pid]
    workers = children(server.process.pid, b"kernelport.worker")
    assert workers == [pid]  # started by the supervisor, once


def test_a_killed_worker_fails_its_batches_and_is_restarted_once(
    server: RunningServer, tmp_path: Path
) -> None:
    metrics = _metrics_ports(server)
    first = _ask(server, "http")
    held: list[str] = []

    def slow() -> None:  # a batch that is running in the worker when it is killed
        try:
            _ask(server, "grpc", -2.0)
            held.append("answered")
        except InferenceServerException as exc:
            held.append(f"{exc.status()} {exc.message()}")

    caller = threading.Thread(target=slow)
    with _Load(server) as load:
        caller.start()
        _wait_for((tmp_path / "mark").exists, 30, "the slow batch running")
        os.kill(first, signal.SIGKILL)
        caller.join(60)

        def moved_on() -> bool:
            now = [_metric(port, "kernelport_worker_pid") for port in metrics]
            return now[0] == now[1] and now[0] not in (None, first)

        _wait_for(moved_on, 30, "both front ends on the restarted worker")
        count = len(load.outcomes)
        _wait_for(lambda: len(load.outcomes) > count + 8, 30, "answers after the restart")
    second = int(_metric(metrics[0], "kernelport_worker_pid") or 0)
    assert held and held[0].startswith("StatusCode.UNAVAILABLE"), held
    assert "worker died" in held[0]
    unexpected = [o for o in load.outcomes if not o.startswith(("ok", "503", "StatusCode.UNAV"))]
    assert unexpected == []
    assert {o for o in load.outcomes if o.startswith("ok")} <= {f"ok {first}", f"ok {second}"}
    assert load.outcomes[-1] == f"ok {second}"
    assert {_ask(server, "http") for _ in range(10)} == {second}
    assert [_metric(port, "kernelport_worker_restarts_total") for port in metrics] == [1, 1]
    assert server.log().count("shared worker started") == 2  # once, then restarted once
    assert not process_alive(first)


def test_a_killed_front_end_leaves_the_worker_serving(server: RunningServer) -> None:
    pid = _ask(server, "http")
    supervisor = server.process.pid
    frontends = _frontends(supervisor)
    assert len(frontends) == 2
    victim = min(frontends)
    os.kill(victim, signal.SIGKILL)
    # reaped, not only dead: a zombie's cmdline is empty before its listening sockets close
    _wait_for(lambda: not process_alive(victim), 30, "the front end reaped")
    # the other front end answers, with the same worker, while the dead one restarts
    assert {_ask(server, "http") for _ in range(10)} == {pid}
    _wait_for(lambda: server.log().count("kernelport.server: listening:") >= 3, 60,
              "the front end listening again")  # fmt: skip
    assert {_ask(server, "http") for _ in range(20)} | {_ask(server, "grpc")} == {pid}
    assert children(supervisor, b"kernelport.worker") == [pid]
    assert server.stop() == 0
    assert not process_alive(pid)
