"""Worker processes driven from this process: a ModelManager and DataPlane in the test, real
``python -m kernelport.worker`` children. The same behaviour through real servers and
tritonclient is in tests/e2e/test_worker_processes.py; here the server side (process host,
pool, supervisor) runs where coverage sees it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import identity_config, process_alive, write_model

from kernelport.backends.registry import BackendRegistry
from kernelport.core.batcher import ModelQueue
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import InferRequest, Tensor

ECHO = """
import os
import time


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        if x.size and x.flat[0] == -1:
            os.abort()
        if x.size and x.flat[0] == -2:
            time.sleep(3600)
        if x.size and x.flat[0] == -3:
            raise ValueError("minus three")
        return {"OUTPUT0": x * 2}
"""


def _python(repo: Path, name: str, execution: dict[str, Any], count: int = 1) -> None:
    config = {
        "backend": "python",
        "max_batch_size": 8,
        "dynamic_batching": {},
        "instance_count": count,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
        "execution": execution,
    }
    write_model(repo, name, config, {"model.py": ECHO.encode()})


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    repo = tmp_path / "repo"
    _python(repo, "echo", {"mode": "worker"}, count=2)
    _python(repo, "stuck", {"mode": "worker", "timeout_s": 1})
    # a tiny arena: batches bigger than it travel inline in the control frames
    _python(repo, "small", {"mode": "worker", "arena_mb": 1})
    text = identity_config("BYTES", [1], max_batch_size=4, execution={"mode": "worker"})
    write_model(repo, "text", text)
    settings = ManagerSettings((repo,), control_mode="explicit", startup_models=("*",))
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    try:
        yield DataPlane(manager, "test")
    finally:
        await manager.close()


def _request(model: str, x: np.ndarray[Any, Any]) -> InferRequest:
    return InferRequest(model, inputs=[Tensor("INPUT0", "FP32", x.shape, x)])


async def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)


def _workers(dp: DataPlane, model: str) -> list[int]:
    """The pids of the model's worker processes that are running."""
    hosts = dp._manager.get(model).pool.hosts  # type: ignore[attr-defined]
    procs = [host._proc for host in hosts]
    return [p.pid for p in procs if p is not None and p.poll() is None]


async def test_batches_run_in_the_worker_and_come_back(dp: DataPlane) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    response = await dp.infer(_request("echo", x))
    np.testing.assert_array_equal(response.outputs[0].data, x * 2)
    # concurrent requests, batched, each gets its own rows back
    rows = [np.full((1, 4), i, np.float32) for i in range(16)]
    answers = await asyncio.gather(*(dp.infer(_request("echo", r)) for r in rows))
    for r, answer in zip(rows, answers, strict=True):
        np.testing.assert_array_equal(answer.outputs[0].data, r * 2)
    # a batch larger than the arena travels inline
    big = np.ones((8, 4), np.float32)
    many = np.concatenate([big] * 2**13)  # 1 MiB of input: more than half the arena
    response = await dp.infer(_request("small", many))
    np.testing.assert_array_equal(response.outputs[0].data, many * 2)
    text = np.array([[b"a"], [b"bc"]], dtype=object)
    echoed = await dp.infer(InferRequest("text", inputs=[Tensor("INPUT0", "BYTES", (2, 1), text)]))
    assert echoed.outputs[0].data.tolist() == [[b"a"], [b"bc"]]


async def test_a_model_error_comes_back_with_its_message(dp: DataPlane) -> None:
    with pytest.raises(ServerError, match="model 'echo' failed: ValueError: minus three"):
        await dp.infer(_request("echo", np.full((1, 4), -3, np.float32)))
    np.testing.assert_array_equal(
        (await dp.infer(_request("echo", np.ones((1, 4), np.float32)))).outputs[0].data,
        np.full((1, 4), 2, np.float32),
    )


async def test_a_worker_that_dies_fails_its_batch_and_comes_back(dp: DataPlane) -> None:
    with pytest.raises(ServerError) as info:  # `small`: its one instance, its one process
        await dp.infer(_request("small", np.full((1, 4), -1, np.float32)))
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "worker died (signal SIGABRT)" in info.value.message
    # Down until the new process has loaded (it starts after a backoff, from a timer that
    # cannot run before this task resumes): health says so.
    assert not dp.model_ready("small")
    assert not dp.ready()
    await _wait(lambda: dp.model_ready("small"), 10, "small ready again")
    assert dp.ready()
    response = await dp.infer(_request("small", np.ones((1, 4), np.float32)))
    np.testing.assert_array_equal(response.outputs[0].data, np.full((1, 4), 2, np.float32))
    assert dp.model_statistics("small")[0].worker_restarts == 1


async def test_python_instances_run_in_processes_of_their_own(dp: DataPlane) -> None:
    # `echo`: two instances of a python model, so two processes (``processes: auto``)
    first = _workers(dp, "echo")
    assert len(set(first)) == 2
    with pytest.raises(ServerError) as info:
        await dp.infer(_request("echo", np.full((1, 4), -1, np.float32)))
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "worker died (signal SIGABRT)" in info.value.message
    # The other process serves on: the model stays ready and answers at once.
    assert dp.model_ready("echo")
    response = await dp.infer(_request("echo", np.ones((1, 4), np.float32)))
    np.testing.assert_array_equal(response.outputs[0].data, np.full((1, 4), 2, np.float32))
    await _wait(lambda: len(_workers(dp, "echo")) == 2, 10, "both processes again")
    now = _workers(dp, "echo")
    assert len(set(now) & set(first)) == 1  # one survivor, one new
    assert dp.model_statistics("echo")[0].worker_restarts == 1
    rows = [np.full((1, 4), i, np.float32) for i in range(16)]
    answers = await asyncio.gather(*(dp.infer(_request("echo", r)) for r in rows))
    for r, answer in zip(rows, answers, strict=True):
        np.testing.assert_array_equal(answer.outputs[0].data, r * 2)


GATE = """
import os
import time
from pathlib import Path

GO = Path({go!r})


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        if x.flat[0] == -4:  # held until the test says go, then the process dies
            while not GO.exists():
                time.sleep(0.005)
            os.abort()
        return {{"OUTPUT0": x * 2}}
"""


async def test_requests_not_yet_handed_to_a_dead_worker_are_served_by_the_next(
    tmp_path: Path,
) -> None:
    repo, go = tmp_path / "repo", tmp_path / "go"
    config = {
        "backend": "python",
        "max_batch_size": 0,  # one request per batch
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
        "execution": {"mode": "worker"},
    }
    write_model(repo, "gate", config, {"model.py": GATE.format(go=str(go)).encode()})
    settings = ManagerSettings((repo,), control_mode="explicit", startup_models=("*",))
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    dp = DataPlane(manager, "test")
    queue = manager.get("gate").queue
    assert isinstance(queue, ModelQueue)

    def send(value: float) -> asyncio.Future[Any]:
        return asyncio.ensure_future(dp.infer(_request("gate", np.full(4, value, np.float32))))

    try:
        # The worker holds two batches (the running one and one behind it); two more wait
        # in the server's queue.
        held = [send(-4), send(1)]
        await _wait(lambda: queue.running == 2, 10, "two batches handed to the worker")
        waiting = [send(2), send(3)]
        await _wait(lambda: queue.queued == 2, 10, "two requests queued in the server")
        assert queue.running == 2
        go.touch()
        for future in held:
            with pytest.raises(ServerError) as info:
                await future
            assert info.value.code is ErrorCode.UNAVAILABLE
            assert "worker died (signal SIGABRT)" in info.value.message
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 30)
        for value, answer in zip((2, 3), answers, strict=True):
            np.testing.assert_array_equal(answer.outputs[0].data, np.full(4, value * 2))
        assert dp.model_statistics("gate")[0].worker_restarts == 1
    finally:
        await manager.close()


async def test_a_killed_worker_is_replaced(dp: DataPlane) -> None:
    [first] = _workers(dp, "small")
    os.kill(first, signal.SIGKILL)
    await _wait(lambda: _workers(dp, "small") not in ([], [first]), 10, "a new worker")
    await _wait(lambda: dp.model_ready("small"), 10, "small ready again")
    response = await dp.infer(_request("small", np.ones((1, 4), np.float32)))
    assert response.outputs[0].data.tolist() == [[2, 2, 2, 2]]
    assert not process_alive(first)


async def test_a_stuck_batch_times_out_and_the_worker_is_replaced(dp: DataPlane) -> None:
    with pytest.raises(ServerError) as info:
        await dp.infer(_request("stuck", np.full((1, 4), -2, np.float32)))
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert "execution timeout of 1s" in info.value.message
    await _wait(lambda: dp.model_ready("stuck"), 10, "stuck ready again")
    response = await dp.infer(_request("stuck", np.ones((1, 4), np.float32)))
    assert response.outputs[0].data.tolist() == [[2, 2, 2, 2]]


async def test_closing_the_manager_stops_every_worker(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _python(repo, "echo", {"mode": "worker"})
    settings = ManagerSettings((repo,), control_mode="explicit", startup_models=("*",))
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    dp = DataPlane(manager, "test")
    pids = _workers(dp, "echo")
    assert pids and all(process_alive(p) for p in pids)
    await manager.close()
    await _wait(lambda: not any(process_alive(p) for p in pids), 10, "workers gone")


async def test_a_decoupled_model_cannot_run_in_a_worker_yet(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    config = {
        "backend": "python",
        "decoupled": True,
        "execution": {"mode": "worker"},
        "inputs": [{"name": "N", "datatype": "INT32", "dims": [1]}],
        "outputs": [{"name": "OUT", "datatype": "INT32", "dims": [1]}],
    }
    code = "class Model:\n    def execute(self, inputs):\n        yield inputs\n"
    write_model(repo, "gen", config, {"model.py": code.encode()})
    manager = ModelManager(ManagerSettings((repo,), control_mode="explicit"), BackendRegistry())
    try:
        with pytest.raises(ServerError, match="execution mode 'worker' is not supported for it"):
            await manager.load("gen")
    finally:
        await manager.close()
