"""Shared model workers (``--frontends N``) driven from this process: the supervisor's
broker and two ModelManagers standing for two front ends, with real ``python -m
kernelport.worker --shared`` children. Through real servers and tritonclient:
tests/e2e/test_shared_workers_e2e.py."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import process_alive, write_model

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.shared_host import ask_broker
from kernelport.errors import ErrorCode, ServerError
from kernelport.hosting.shared_workers import WorkerBroker
from kernelport.types import InferRequest, Tensor

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
        if x.size and x.flat[0] == -3:
            raise ValueError("minus three")
        pid = np.full((x.shape[0], 1), os.getpid(), np.int64)
        return {"OUTPUT0": x * 2, "PID": pid}
"""


def _python(repo: Path, name: str, execution: dict[str, Any], count: int = 1) -> None:
    config = {
        "backend": "python",
        "max_batch_size": 8,
        "dynamic_batching": {},
        "instance_count": count,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
        "outputs": [
            {"name": "OUTPUT0", "datatype": "FP32", "dims": [4]},
            {"name": "PID", "datatype": "INT64", "dims": [1]},
        ],
        "execution": execution,
    }
    write_model(repo, name, config, {"model.py": MODEL.encode()})


class _Node:
    """The supervisor's broker, watched on this loop, and two front ends' data planes."""

    def __init__(self, broker: WorkerBroker, planes: list[DataPlane]) -> None:
        self.broker = broker
        self.planes = planes


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[_Node]:
    monkeypatch.setenv("KP_TEST_MARK", str(tmp_path / "mark"))
    repo = tmp_path / "repo"
    _python(repo, "echo", {"mode": "worker", "processes": "model"}, count=2)
    _python(repo, "stuck", {"mode": "worker", "timeout_s": 1})
    _python(repo, "pair", {"mode": "worker"}, count=2)  # a process per instance
    broker = WorkerBroker(tmp_path)
    watching = True

    async def watch() -> None:
        while watching:
            broker.check()
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    managers = []
    try:
        for _ in range(2):
            settings = ManagerSettings(
                (repo,), control_mode="explicit", startup_models=("*",),
                shared_workers=broker.address,
            )  # fmt: skip
            manager = ModelManager(settings, BackendRegistry())
            managers.append(manager)
        await asyncio.gather(*(m.load_initial() for m in managers))
        yield _Node(broker, [DataPlane(m, "test") for m in managers])
    finally:
        for manager in managers:
            await manager.close()
        watching = False
        await watcher
        await asyncio.to_thread(broker.stop)


def _request(model: str, x: np.ndarray[Any, Any]) -> InferRequest:
    return InferRequest(model, inputs=[Tensor("INPUT0", "FP32", x.shape, x)])


async def _pid(dp: DataPlane, model: str = "echo") -> int:
    response = await dp.infer(_request(model, np.ones((1, 4), np.float32)))
    np.testing.assert_array_equal(response.outputs[0].data, np.full((1, 4), 2, np.float32))
    return int(response.outputs[1].data[0, 0])


async def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)


async def test_a_process_per_instance_is_shared_too(node: _Node) -> None:
    pair = [w for w in node.broker.workers if w.model == "pair"]
    assert len(pair) == 2 and len({w.key for w in pair}) == 2
    pids = {w.pids[-1] for w in pair}
    assert len(pids) == 2
    # Both front ends send to both processes (each front end's two instances are the two).
    rows = [np.full((1, 4), i, np.float32) for i in range(32)]
    answers = await asyncio.gather(
        *(node.planes[i % 2].infer(_request("pair", r)) for i, r in enumerate(rows))
    )
    for r, answer in zip(rows, answers, strict=True):
        np.testing.assert_array_equal(answer.outputs[0].data, r * 2)
        assert int(answer.outputs[1].data[0, 0]) in pids


async def test_both_front_ends_use_one_worker(node: _Node) -> None:
    one, two = node.planes
    [echo] = [w for w in node.broker.workers if w.model == "echo"]
    pid = await _pid(one)
    assert await _pid(two) == pid == echo.pids[-1]
    stats = [dp.model_statistics("echo")[0] for dp in node.planes]
    assert [s.worker_pid for s in stats] == [pid, pid]
    if hasattr(os, "SCHED_BATCH"):  # it yields a shared core to its front ends
        assert os.sched_getscheduler(pid) == os.SCHED_BATCH
    # concurrent batches from both front ends, each caller gets its own rows back
    rows = [np.full((1, 4), i, np.float32) for i in range(24)]
    answers = await asyncio.gather(
        *(node.planes[i % 2].infer(_request("echo", r)) for i, r in enumerate(rows))
    )
    for r, answer in zip(rows, answers, strict=True):
        np.testing.assert_array_equal(answer.outputs[0].data, r * 2)
        assert answer.outputs[1].data.tolist() == [[pid]]
    with pytest.raises(ServerError, match="model 'echo' failed: ValueError: minus three"):
        await two.infer(_request("echo", np.full((1, 4), -3, np.float32)))


async def test_a_killed_worker_is_restarted_once_for_both(node: _Node) -> None:
    one, two = node.planes
    [echo] = [w for w in node.broker.workers if w.model == "echo"]
    first = await _pid(one)
    os.kill(first, signal.SIGKILL)
    await _wait(lambda: len(echo.pids) == 2, 10, "a new worker")
    await _wait(lambda: one.model_ready("echo") and two.model_ready("echo"), 10, "ready")
    second = await _pid(one)
    assert second == await _pid(two) == echo.pids[1] != first
    assert echo.restarts == 1
    assert not process_alive(first)
    assert [dp.model_statistics("echo")[0].worker_restarts for dp in node.planes] == [1, 1]


async def test_a_stuck_batch_fails_every_front_ends_batches_on_it(node: _Node) -> None:
    one, two = node.planes
    mark = Path(os.environ["KP_TEST_MARK"])
    before = await _pid(two, "stuck")
    stuck = asyncio.ensure_future(one.infer(_request("stuck", np.full((1, 4), -2, np.float32))))
    await _wait(mark.exists, 10, "the stuck batch running")
    waiting = asyncio.ensure_future(two.infer(_request("stuck", np.ones((1, 4), np.float32))))
    with pytest.raises(ServerError) as info:
        await stuck
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    try:
        await waiting  # queued in front end 2 (served after the restart), or in the worker
    except ServerError as exc:  # behind the stuck batch: its worker was killed, or (on a slow
        # machine) its own execution timeout fired first
        assert exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED), exc
    await _wait(lambda: one.model_ready("stuck") and two.model_ready("stuck"), 10, "ready")
    assert await _pid(one, "stuck") == await _pid(two, "stuck") != before


async def test_a_front_end_that_goes_away_leaves_the_worker_serving(node: _Node) -> None:
    one, two = node.planes
    pid = await _pid(one)
    await one._manager.unload("echo")  # type: ignore[attr-defined]
    assert await _pid(two) == pid
    await one._manager.load("echo")  # type: ignore[attr-defined]
    assert await _pid(one) == pid  # attached again to the same worker


async def test_a_broker_that_is_gone_fails_the_load_clearly(tmp_path: Path) -> None:
    with pytest.raises(ServerError) as info:
        await ask_broker(tmp_path / "nothing.sock", "k", "m")
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "did not start its shared worker" in info.value.message


async def test_stopping_the_broker_stops_its_workers(tmp_path: Path) -> None:
    broker = WorkerBroker(tmp_path)
    address = await ask_broker(broker.address, "k", "m")
    assert address == await ask_broker(broker.address, "k", "m")  # one worker per key
    [worker] = broker.workers
    assert worker.process is not None and process_alive(worker.process.pid)
    await asyncio.to_thread(broker.stop)
    assert worker.process.returncode == 0
    with pytest.raises(OSError):
        broker.ensure("other", "m")


async def test_a_model_that_fails_to_load_fails_each_front_ends_load(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _python(repo, "echo", {"mode": "worker"})
    (repo / "echo" / "1" / "model.py").write_text(
        "class Model:\n    def __init__(self):\n        raise RuntimeError('no weights')\n\n"
        "    def execute(self, inputs):\n        return inputs\n"
    )
    broker = WorkerBroker(tmp_path)
    settings = ManagerSettings((repo,), control_mode="explicit", shared_workers=broker.address)
    managers = [ModelManager(settings, BackendRegistry()) for _ in range(2)]
    try:
        for manager in managers:  # the worker stays up: each load is tried, and fails, again
            with pytest.raises(ServerError, match="no weights"):
                await manager.load("echo")
        [worker] = broker.workers
        assert worker.restarts == 0
    finally:
        for manager in managers:
            await manager.close()
        await asyncio.to_thread(broker.stop)


async def test_a_connection_without_an_arena_is_dropped(tmp_path: Path) -> None:
    import socket

    broker = WorkerBroker(tmp_path)
    try:
        address = await ask_broker(broker.address, "k", "m")
        for hello in (b"\0", b""):  # a byte with no descriptor, and no byte at all
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(address)
            if hello:
                sock.sendall(hello)
            sock.shutdown(socket.SHUT_WR)
            assert await asyncio.to_thread(sock.recv, 1) == b""  # closed by the worker
            sock.close()
        [worker] = broker.workers
        assert worker.process is not None and worker.process.poll() is None
    finally:
        await asyncio.to_thread(broker.stop)
