"""A worker process's short batch awaited on the loop's thread (``ProcessHost.run_now``), and
which batches travel in the frame rather than the arena; real ``python -m kernelport.worker``
children, driven from this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import write_model

from kernelport.backends.registry import BackendRegistry
from kernelport.core import process_host
from kernelport.core.dataplane import DataPlane
from kernelport.core.execution import BatchResult
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.process_pool import ProcessPool
from kernelport.core.wire import INLINE_MAX
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import InferRequest, Tensor

MODEL = """
import os
import time


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        if x.size and x.flat[0] == -1:
            os.abort()
        if x.size and x.flat[0] == -4:
            time.sleep(0.2)
        return {"OUTPUT0": x * 2}
"""


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ProcessPool]:
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "execution": {"mode": "worker"},
    }
    write_model(tmp_path / "repo", "twice", config, {"model.py": MODEL.encode()})
    settings = ManagerSettings((tmp_path / "repo",), control_mode="explicit",
                               startup_models=("*",))  # fmt: skip
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    try:
        pool = manager.get("twice").pool  # type: ignore[attr-defined]
        assert isinstance(pool, ProcessPool)
        yield pool
    finally:
        await manager.close()


def _run(pool: ProcessPool, x: np.ndarray[Any, Any], now: bool) -> asyncio.Future[BatchResult]:
    worker = pool.workers[0]
    config = pool.host.config
    run = worker.run_now if now else worker.submit_batch
    return run([{"INPUT0": x}], [1], config)  # type: ignore[attr-defined,no-any-return]


async def test_run_now_answers_before_it_returns(
    pool: ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pool.inline  # the queue may pick run_now for a short batch
    monkeypatch.setattr(process_host, "WAIT_NOW_S", 60.0)  # no load can outlast it
    x = np.arange(8, dtype=np.float32)
    future = _run(pool, x, now=True)
    assert future.done()
    np.testing.assert_array_equal(future.result().outputs[0]["OUTPUT0"], x * 2)


async def test_a_slow_batch_run_now_is_answered_through_the_loop(
    pool: ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_host, "WAIT_NOW_S", 0.01)  # the model sleeps 0.2 s
    x = np.full(4, -4, np.float32)
    future = _run(pool, x, now=True)
    assert not future.done()
    result = await future
    np.testing.assert_array_equal(result.outputs[0]["OUTPUT0"], x * 2)


async def test_a_worker_dying_during_run_now_gives_unavailable(
    pool: ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_host, "WAIT_NOW_S", 60.0)  # its EOF ends the wait, not this
    future = _run(pool, np.full(4, -1, np.float32), now=True)
    assert not pool.host.up
    with pytest.raises(ServerError) as info:
        await future
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "worker died (signal SIGABRT)" in info.value.message


async def test_small_batches_travel_in_the_frame_and_large_ones_in_the_arena(
    pool: ProcessPool,
) -> None:
    host = pool.host
    for count, in_arena in ((4, False), (INLINE_MAX // 4, False), (INLINE_MAX // 4 + 1, True)):
        x = np.arange(count, dtype=np.float32)
        future = _run(pool, x, now=False)
        [job] = host._in_flight.values()
        assert (job.input_offset is not None) is in_arena
        assert (host._inputs.used_bytes > 0) is in_arena
        np.testing.assert_array_equal((await future).outputs[0]["OUTPUT0"], x * 2)
        assert host._inputs.used_bytes == 0  # freed with the reply


async def test_every_request_through_the_queue_is_answered(tmp_path: Path) -> None:
    # The queue picks run_now once it has learned the batch is short; the answers are the
    # same either way.
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "execution": {"mode": "worker"},
    }
    write_model(tmp_path / "repo", "twice", config, {"model.py": MODEL.encode()})
    settings = ManagerSettings((tmp_path / "repo",), control_mode="explicit",
                               startup_models=("*",))  # fmt: skip
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    try:
        dp = DataPlane(manager, "test")
        for i in range(30):
            x = np.full(3, i, np.float32)
            request = InferRequest("twice", inputs=[Tensor("INPUT0", "FP32", x.shape, x)])
            response = await dp.infer(request)
            np.testing.assert_array_equal(response.outputs[0].data, x * 2)
    finally:
        await manager.close()
