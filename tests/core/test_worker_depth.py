"""A worker process holds a second batch behind the running one (``ProcessPool.depth``):
each batch writes its outputs into a slot of its own, and the execution timeout counts from
when a batch starts, not from when it was sent. Real ``python -m kernelport.worker``
children, driven from this process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from helpers import load_repository, write_model

from kernelport.core.execution import BatchResult
from kernelport.core.manager import ModelManager
from kernelport.core.process_pool import ProcessPool
from kernelport.core.wire import INLINE_MAX, unpack_refs, unpack_timing

SLOW = """
import time

class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        time.sleep(float(x[0]))  # the first element says how long the batch runs
        return {"OUTPUT0": x * 2}
"""


async def _slow(tmp_path: Path, **execution: Any) -> ModelManager:
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "execution": {"mode": "worker", **execution},
    }
    write_model(tmp_path / "repo", "slow", config, {"model.py": SLOW.encode()})
    manager: ModelManager = await load_repository(tmp_path / "repo")
    return manager


def _send(pool: ProcessPool, x: np.ndarray[Any, Any]) -> asyncio.Future[BatchResult]:
    worker = pool.workers[0]
    return worker.submit_batch([{"INPUT0": x}], [1], pool.hosts[0].config)  # type: ignore[attr-defined,no-any-return]


async def test_two_batches_held_at_once_answer_from_slots_of_their_own(tmp_path: Path) -> None:
    manager = await _slow(tmp_path)
    try:
        pool = manager.get("slow").pool
        assert isinstance(pool, ProcessPool) and pool.depth == 2
        host = pool.hosts[0]
        offsets: list[int] = []
        resolve = host._resolve

        def spy(job: Any, body: memoryview) -> None:
            _, pos = unpack_timing(body)
            refs, _ = unpack_refs(body, pos)
            offsets.extend(ref.offset for ref in refs if not ref.inline)
            resolve(job, body)

        host._resolve = spy  # type: ignore[method-assign]
        big = INLINE_MAX // 4 * 2  # outputs too large for the frame: they use the arena
        xs = [np.full(big, 0.001 * (i + 1), np.float32) for i in range(4)]
        for pair in (xs[:2], xs[2:]):  # two held at once, twice: the slots alternate
            futures = [_send(pool, x) for x in pair]
            results = await asyncio.gather(*futures)
            for x, result in zip(pair, results, strict=True):
                np.testing.assert_array_equal(result.outputs[0]["OUTPUT0"], x * 2)
        assert len(offsets) == 4
        assert offsets[0] != offsets[1] and offsets[2] != offsets[3]
        assert offsets[0] == offsets[2] and offsets[1] == offsets[3]
    finally:
        await manager.close()


async def test_the_execution_timeout_counts_from_a_held_batchs_start(tmp_path: Path) -> None:
    # Each batch runs 1.5 s, under the 2.5 s timeout; the second waits 1.5 s behind the
    # first, so a timeout counted from sending would have killed it at 2.5 s.
    manager = await _slow(tmp_path, timeout_s=2.5)
    try:
        pool = manager.get("slow").pool
        assert isinstance(pool, ProcessPool)
        xs = [np.full(4, 1.5, np.float32), np.full(4, 1.5, np.float32)]
        results = await asyncio.gather(*(_send(pool, x) for x in xs))
        for x, result in zip(xs, results, strict=True):
            np.testing.assert_array_equal(result.outputs[0]["OUTPUT0"], x * 2)
        assert pool.restarts == 0
        # The wait behind the first batch is reported (the statistics count it as queue
        # time), and the first waited for nothing.
        assert results[0].waited_ns == 0
        assert results[1].waited_ns >= 1.4e9
    finally:
        await manager.close()
