"""Which batches travel in the frame rather than the arena, and that either way every answer
is right; real ``python -m kernelport.worker`` children, driven from this process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import load_repository, write_model

from kernelport.core.dataplane import DataPlane
from kernelport.core.execution import BatchResult
from kernelport.core.manager import ModelManager
from kernelport.core.process_pool import ProcessPool
from kernelport.core.wire import INLINE_MAX
from kernelport.types import InferRequest, Tensor

MODEL = """
class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"] * 2}
"""


async def _twice(tmp_path: Path) -> ModelManager:
    """Model ``twice`` (doubles its input) in a worker process, loaded."""
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "execution": {"mode": "worker"},
    }
    write_model(tmp_path / "repo", "twice", config, {"model.py": MODEL.encode()})
    manager: ModelManager = await load_repository(tmp_path / "repo")
    return manager


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ProcessPool]:
    manager = await _twice(tmp_path)
    try:
        pool = manager.get("twice").pool  # type: ignore[attr-defined]
        assert isinstance(pool, ProcessPool)
        yield pool
    finally:
        await manager.close()


def _run(pool: ProcessPool, x: np.ndarray[Any, Any]) -> asyncio.Future[BatchResult]:
    worker = pool.workers[0]
    return worker.submit_batch([{"INPUT0": x}], [1], pool.hosts[0].config)  # type: ignore[attr-defined,no-any-return]


async def test_small_batches_travel_in_the_frame_and_large_ones_in_the_arena(
    pool: ProcessPool,
) -> None:
    host = pool.hosts[0]
    for count, in_arena in ((4, False), (INLINE_MAX // 4, False), (INLINE_MAX // 4 + 1, True)):
        x = np.arange(count, dtype=np.float32)
        future = _run(pool, x)
        [job] = host._in_flight.values()
        assert (job.input_offset is not None) is in_arena
        assert (host._inputs.used_bytes > 0) is in_arena
        np.testing.assert_array_equal((await future).outputs[0]["OUTPUT0"], x * 2)
        assert host._inputs.used_bytes == 0  # freed with the reply


async def test_every_request_through_the_queue_is_answered(tmp_path: Path) -> None:
    manager = await _twice(tmp_path)
    try:
        dp = DataPlane(manager, "test")
        for i in range(30):
            x = np.full(3, i, np.float32)
            request = InferRequest("twice", inputs=[Tensor("INPUT0", "FP32", x.shape, x)])
            response = await dp.infer(request)
            np.testing.assert_array_equal(response.outputs[0].data, x * 2)
    finally:
        await manager.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_a_worker_does_not_preempt_its_front_end(pool: ProcessPool) -> None:
    # SCHED_BATCH: a batch arriving waits for the front end to yield a shared core
    # (worker.main.yield_to_front_ends); threads it starts later inherit the policy.
    pid = pool.worker_pid
    assert pid is not None and pid != os.getpid()
    assert os.sched_getscheduler(pid) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the server's own policy is untouched
