"""Short batches run on the event loop (``ModelConfig.inline_below_us``), on the fake clock."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from test_batcher import US, Batch, FakeClock, Harness, turn

from kernelport.core.backend import Arrays
from kernelport.core.batcher import ModelQueue
from kernelport.core.execution import BatchResult, Worker, WorkerPool
from kernelport.core.fill import ArrivalModel
from kernelport.core.model_config import DynamicBatching, ModelConfig, TensorConfig
from kernelport.core.scheduler import DeviceScheduler
from kernelport.core.stats import ModelStats
from kernelport.errors import ErrorCode, ServerError


@dataclass
class TwoWayWorker:
    """A fake worker that records which way each batch went: its thread, or run_now."""

    log: list[Batch]
    ways: list[str]
    inline_ns: int = 100 * US  # what an inline run reports it took

    def submit_batch(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self.log.append(Batch(parts, counts, future))
        self.ways.append("thread")
        return future

    def run_now(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        future.set_result(BatchResult(list(parts), 0, self.inline_ns, 0))
        self.log.append(Batch(parts, counts, future))
        self.ways.append("inline")
        return future


def inline_harness(
    ways: list[str],
    *,
    instances: int = 1,
    below_us: int = 300,
    alone_us: int = 0,
    inline: bool = True,
    dims: tuple[int, ...] = (2,),
    max_batch: int = 4,
) -> Harness:
    config = ModelConfig(
        name="m",
        backend="identity",
        max_batch_size=max_batch,
        inputs=(TensorConfig(name="x", datatype="FP32", dims=dims),),
        outputs=(TensorConfig(name="x", datatype="FP32", dims=dims),),
        dynamic_batching=DynamicBatching(fill_batches=False),
        inline_below_us=below_us,
        inline_alone_below_us=alone_us,
    )
    clock, batches = FakeClock(), []
    workers = [TwoWayWorker(batches, ways) for _ in range(instances)]
    pool = WorkerPool(workers, inline=inline)  # type: ignore[arg-type]  # duck-typed
    stats = ModelStats()
    queue = ModelQueue(config, pool, stats, DeviceScheduler("cpu"), 1.0, clock)
    return Harness(queue, clock, batches, stats)


async def one(h: Harness, tag: float, infer_ns: int = 100 * US) -> None:
    """A request, run to the end (completed by hand when it went to a thread)."""
    task = await h.submit(1, tag)
    if not h.batches[-1].future.done():
        await h.complete(infer_ns=infer_ns)
    await turn()
    assert (await task)[0]["x"][0, 0] == tag


async def test_a_short_batch_runs_inline_once_its_cost_is_known() -> None:
    ways: list[str] = []
    h = inline_harness(ways)
    for tag in range(3):
        await one(h, tag)
    assert ways == ["thread", "inline", "inline"]  # the first one's cost was unknown
    assert h.stats.snapshot("m", "1").execution_count == 3


async def test_a_long_batch_stays_on_the_thread() -> None:
    ways: list[str] = []
    h = inline_harness(ways)
    for tag in range(3):
        await one(h, tag, infer_ns=301 * US)  # over the 300 us threshold
    assert ways == ["thread"] * 3


async def test_a_long_inline_run_sends_batches_to_the_thread_until_runs_there_are_short() -> None:
    ways: list[str] = []
    h = inline_harness(ways)
    await one(h, 0)  # 100 us, learned on the thread
    h.queue._pool.workers[0].inline_ns = 3000 * US  # preempted, or its cost hangs on the data
    await one(h, 1)  # inline; the average is now over 300 us
    for tag in range(2, 12):
        await one(h, tag, infer_ns=100 * US)
    assert ways[:2] == ["thread", "inline"]
    first_back = ways.index("inline", 2)
    assert ways[2:first_back] == ["thread"] * (first_back - 2) and first_back > 4


async def test_inline_is_off_at_zero_when_the_pool_forbids_it_or_a_dim_varies() -> None:
    for kwargs in ({"below_us": 0}, {"inline": False}, {"dims": (-1,)},
                   {"below_us": 0, "alone_us": 500, "dims": (-1,)}):  # fmt: skip
        ways: list[str] = []
        h = inline_harness(ways, **kwargs)  # type: ignore[arg-type]
        for tag in range(3):
            await one(h, tag)
        assert ways == ["thread"] * 3, kwargs


async def test_a_thread_batch_keeps_a_second_batch_off_the_loop() -> None:
    ways: list[str] = []
    h = inline_harness(ways, instances=2)
    await one(h, 0, infer_ns=100 * US)
    h.queue.cost.observe(2, 1000 * US)  # a batch of 2 is long: it goes to a thread
    first = await h.submit(2, 3)  # two rows: long, to a thread
    assert ways[-1] == "thread"
    second = await h.submit(1, 4)  # short, but a batch runs on the other instance's thread
    assert ways[-1] == "thread"
    await h.complete(-2)
    await h.complete(-1)
    await first, await second


async def test_a_lone_request_runs_inline_up_to_the_alone_threshold() -> None:
    ways: list[str] = []
    h = inline_harness(ways, below_us=100, alone_us=500)
    for tag in range(3):
        await one(h, tag, infer_ns=400 * US)  # over 100, under 500: inline when alone
    assert ways == ["thread", "inline", "inline"]


async def test_with_company_only_the_short_threshold_runs_inline() -> None:
    ways: list[str] = []
    h = inline_harness(ways, below_us=100, alone_us=500, max_batch=1)
    h.queue._pool.workers[0].inline_ns = 400 * US
    a = await h.submit(1, 0)  # cost unknown: the thread
    b = await h.submit(1, 1)  # queued behind a
    c = await h.submit(1, 2)  # queued behind b
    await h.complete(-1, infer_ns=400 * US)  # a ends: one row costs 400 us
    await turn()
    assert ways == ["thread", "thread"]  # b has company (c): only <= 100 us would go inline
    await h.complete(-1, infer_ns=400 * US)  # b ends; c is cut while b is being answered
    await turn()
    assert ways == ["thread"] * 3
    await h.complete(-1, infer_ns=400 * US)
    assert [(await t)[0]["x"][0, 0] for t in (a, b, c)] == [0, 1, 2]
    await one(h, 3)  # nothing else in flight: a lone 400 us batch runs on the loop
    assert ways == ["thread"] * 3 + ["inline"]


async def test_a_lone_batch_among_overlapping_arrivals_stays_on_the_thread() -> None:
    """At c=32 the queue can be empty while requests are still being parsed: the arrival
    model's overlap says so, and then only the short threshold runs inline."""
    ways: list[str] = []
    h = inline_harness(ways, below_us=100, alone_us=500)
    arrivals = ArrivalModel()
    arrivals.overlap = 1.0  # every recent arrival found company
    h.queue._arrivals = arrivals
    await one(h, 0, infer_ns=400 * US)
    await one(h, 1, infer_ns=400 * US)
    assert ways == ["thread", "thread"]
    arrivals.overlap = 0.0  # one client at a time again
    await one(h, 2, infer_ns=400 * US)
    assert ways[-1] == "inline"


# --- a real worker ------------------------------------------------------------------------


class _Doubler:
    def __init__(self) -> None:
        self.threads: set[int] = set()

    def execute(self, inputs: Arrays) -> Arrays:
        self.threads.add(threading.get_ident())
        if float(inputs["x"].flat[0]) < 0:
            raise ValueError("negative")
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        pass


async def test_run_now_runs_on_the_callers_thread_and_reports_errors_like_a_batch() -> None:
    instance = _Doubler()
    worker = Worker(instance, "w")  # type: ignore[arg-type]
    config = ModelConfig(name="d", backend="identity", max_batch_size=4)
    try:
        parts: list[Arrays] = [{"x": np.ones((1, 2), np.float32)}, {"x": np.ones((2, 2))}]
        result = await worker.run_now(parts, [1, 2], config)
        assert [o["y"].shape for o in result.outputs] == [(1, 2), (2, 2)]
        assert instance.threads == {threading.get_ident()}
        with pytest.raises(ServerError) as info:
            await worker.run_now([{"x": -np.ones((1, 2))}], [1], config)
        assert info.value.code is ErrorCode.INTERNAL and "negative" in str(info.value)
    finally:
        worker.close()
