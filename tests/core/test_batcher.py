"""ModelQueue in-process: a fake clock the test advances and workers the test completes.

No real time passes and nothing sleeps: ``turn()`` lets the event loop run what is already
scheduled (one iteration), which is how a finished batch's callback and the callers' tasks
get to run. Every test here is deterministic.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from kernelport.core.backend import Arrays
from kernelport.core.batcher import ModelQueue, RequestOptions, request_options
from kernelport.core.execution import BatchResult, WorkerPool
from kernelport.core.model_config import DynamicBatching, ModelConfig, TensorConfig
from kernelport.core.scheduler import DeviceScheduler
from kernelport.core.stats import ModelStats
from kernelport.errors import ErrorCode, ServerError

US = 1000  # ns


# --- fakes -------------------------------------------------------------------------------


@dataclass
class _Timer:
    fn: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time stands still until ``advance``; due callbacks run in time order as it passes."""

    def __init__(self) -> None:
        self.now = 1_000_000_000
        self._timers: list[tuple[int, int, _Timer]] = []
        self._seq = itertools.count()

    def now_ns(self) -> int:
        return self.now

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(fn)
        heapq.heappush(self._timers, (self.now + round(delay_s * 1e9), next(self._seq), timer))
        return timer

    def advance(self, ns: int) -> None:
        target = self.now + ns
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self.now = max(self.now, when)
                timer.fn()
        self.now = target


@dataclass
class Batch:
    """One batch a fake worker received; the test decides when and how it ends."""

    parts: list[Arrays]
    counts: list[int]
    future: asyncio.Future[BatchResult]

    @property
    def tags(self) -> list[float]:
        return [float(p["x"].flat[0]) for p in self.parts]

    def complete(self, infer_ns: int = 1000, waited_ns: int = 0) -> None:
        self.future.set_result(BatchResult(list(self.parts), 0, infer_ns, 0, waited_ns))  # echo

    def fail(self, error: Exception) -> None:
        self.future.set_exception(error)


@dataclass
class FakeWorker:
    log: list[Batch]

    def submit_batch(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self.log.append(Batch(parts, counts, future))
        return future


@dataclass
class Harness:
    queue: ModelQueue
    clock: FakeClock
    batches: list[Batch] = field(default_factory=list)
    stats: ModelStats = field(default_factory=ModelStats)

    async def submit(
        self, rows: int, tag: float, width: int = 2, **params: Any
    ) -> asyncio.Task[Any]:
        """A caller's request, queued (its task has run up to waiting on its result)."""
        inputs = {"x": np.full((rows, width), tag, np.float32)}
        task = asyncio.create_task(self.queue.submit(inputs, rows, params))
        await turn()
        return task

    async def complete(self, index: int = -1, infer_ns: int = 1000) -> Batch:
        batch = self.batches[index]
        batch.complete(infer_ns)
        await turn()  # the queue's done-callback runs: worker and slot come back
        return batch


async def turn() -> None:
    """Run what is already scheduled on the loop, once round; no time passes."""
    await asyncio.sleep(0)


def harness(
    *,
    instances: int = 1,
    max_batch_size: int = 4,
    device: DeviceScheduler | None = None,
    clock: FakeClock | None = None,
    weight: float = 1.0,
    name: str = "m",
    batching: dict[str, Any] | None = None,
    depth: int = 1,
) -> Harness:
    config = ModelConfig(
        name=name,
        backend="identity",
        max_batch_size=max_batch_size,
        inputs=(TensorConfig(name="x", datatype="FP32", dims=(-1,)),),
        outputs=(TensorConfig(name="x", datatype="FP32", dims=(-1,)),),
        dynamic_batching=DynamicBatching(**batching) if batching is not None else None,
    )
    clock = clock or FakeClock()
    batches: list[Batch] = []
    pool = WorkerPool([FakeWorker(batches) for _ in range(instances)])  # duck-typed workers
    pool.depth = depth  # 2: as a worker process's pool
    stats = ModelStats()
    queue = ModelQueue(config, pool, stats, device or DeviceScheduler("cpu"), weight, clock)
    return Harness(queue, clock, batches, stats)


def code(task: asyncio.Task[Any]) -> ErrorCode:
    error = task.exception()
    assert isinstance(error, ServerError), error
    return error.code


DELAY_1S = {"max_queue_delay_us": 1_000_000}


# --- cutting batches ---------------------------------------------------------------------


async def test_a_worker_process_takes_a_full_batch_ahead_but_never_one_that_can_grow() -> None:
    h = harness(depth=2, batching={})
    first = await h.submit(4, 1)
    assert [b.counts for b in h.batches] == [[4]]
    half = await h.submit(2, 2)
    assert len(h.batches) == 1 and h.queue.queued == 1  # could still grow: it waits
    other = await h.submit(2, 3)
    assert [b.counts for b in h.batches] == [[4], [2, 2]]  # full now: sent behind the first
    last = await h.submit(4, 4)
    assert len(h.batches) == 2 and h.queue.queued == 1  # the worker holds two already
    await h.complete(0)
    assert [b.counts for b in h.batches] == [[4], [2, 2], [4]]  # room again: sent ahead
    await h.complete(1)
    await h.complete(2)
    answers = [(await t)[0]["x"][:, 0].tolist() for t in (first, half, other, last)]
    assert answers == [[1] * 4, [2, 2], [3, 3], [4] * 4]


async def test_time_a_batch_waited_in_its_worker_counts_as_queue_time() -> None:
    h = harness(depth=2, batching={})
    task = await h.submit(4, 1)
    h.clock.advance(5_000)
    h.batches[0].complete(waited_ns=70_000)
    await turn()
    assert (await task)[1].queue_ns == 70_000  # cut at once, then 70 µs behind another


async def test_instance_threads_never_take_a_batch_ahead() -> None:
    h = harness(batching={})
    await h.submit(4, 1)
    await h.submit(4, 2)
    assert [b.counts for b in h.batches] == [[4]] and h.queue.queued == 1
    await h.complete(0)
    assert [b.counts for b in h.batches] == [[4], [4]]


async def test_a_full_batch_is_cut_at_once_and_each_caller_gets_its_rows() -> None:
    h = harness(batching=DELAY_1S)
    a, b = await h.submit(1, 1), await h.submit(1, 2)
    assert h.batches == [] and h.queue.queued == 2  # waiting to grow
    c = await h.submit(2, 3)
    assert [b.counts for b in h.batches] == [[1, 1, 2]] and h.queue.queued == 0
    await h.complete()
    assert [(await t)[0]["x"][:, 0].tolist() for t in (a, b, c)] == [[1], [2], [3, 3]]
    assert (await c)[1].batch_size == 4


async def test_a_partial_batch_is_cut_when_the_oldest_has_waited_the_delay() -> None:
    h = harness(batching={"max_queue_delay_us": 100})
    task = await h.submit(1, 1)
    h.clock.advance(99 * US)
    assert h.batches == []
    await h.submit(1, 2)
    h.clock.advance(1 * US)  # 100 us since the first: both go
    assert [b.counts for b in h.batches] == [[1, 1]]
    await h.complete()
    assert (await task)[1].queue_ns == 100 * US


async def test_no_delay_cuts_whatever_is_there() -> None:
    h = harness(batching={})
    await h.submit(1, 1)
    assert [b.counts for b in h.batches] == [[1]]


async def test_preferred_size_is_cut_without_waiting_for_the_delay() -> None:
    h = harness(batching={**DELAY_1S, "preferred_batch_sizes": [2]})
    await h.submit(1, 1)
    assert h.batches == []
    await h.submit(1, 2)
    assert [b.tags for b in h.batches] == [[1, 2]]
    for tag in (3, 4, 5):  # the only worker is busy: they accumulate
        await h.submit(1, tag)
    await h.complete()
    # 3 waiting: the largest preferred size that fits goes, the rest waits for company
    assert [b.tags for b in h.batches] == [[1, 2], [3, 4]]
    await h.complete()
    assert len(h.batches) == 2
    h.clock.advance(1_000_000 * US)
    assert [b.tags for b in h.batches][-1] == [5]


async def test_only_requests_of_one_shape_share_a_batch() -> None:
    h = harness(batching={})
    await h.submit(1, 0)  # occupies the only worker
    for tag, width in ((1, 2), (2, 3), (3, 2), (4, 3)):
        await h.submit(1, tag, width=width)
    await h.complete()
    await h.complete()
    assert [b.tags for b in h.batches] == [[0], [1, 3], [2, 4]]


async def test_without_a_batcher_requests_run_one_at_a_time() -> None:
    h = harness(instances=1, batching=None)
    first, second = await h.submit(2, 1), await h.submit(2, 2)
    assert [b.counts for b in h.batches] == [[2]]
    await h.complete()
    await h.complete()
    assert [b.counts for b in h.batches] == [[2], [2]]
    assert (await first)[0]["x"].shape == (2, 2) and (await second)[1].batch_size == 2


# --- queue policy ------------------------------------------------------------------------


async def test_priority_levels_jump_the_queue() -> None:
    h = harness(max_batch_size=1, batching={"priority_levels": 2, "default_priority_level": 2})
    await h.submit(1, 0)  # running
    await h.submit(1, 1, priority=2)
    await h.submit(1, 2, priority=1)
    await h.submit(1, 3)  # no priority: the default level, 2
    await h.submit(1, 4, priority=7)  # past the levels: the default level too
    await h.submit(1, 5, priority=1)
    for _ in range(5):
        await h.complete()
    assert [b.tags[0] for b in h.batches] == [0, 2, 5, 1, 3, 4]


async def test_a_request_that_times_out_in_the_queue_never_runs() -> None:
    h = harness(max_batch_size=1, batching={"default_timeout_us": 500})
    await h.submit(1, 0)  # running; started at once, so its timeout no longer applies
    late = await h.submit(1, 1, timeout=50)
    default = await h.submit(1, 2)  # the model's default_timeout_us
    h.clock.advance(50 * US)
    await turn()
    assert late.done() and code(late) is ErrorCode.DEADLINE_EXCEEDED
    assert not default.done() and h.queue.queued == 1
    h.clock.advance(450 * US)
    await turn()
    assert code(default) is ErrorCode.DEADLINE_EXCEEDED
    await h.complete()
    assert len(h.batches) == 1 and h.queue.queued == 0
    assert h.stats.rejected == {ErrorCode.DEADLINE_EXCEEDED.value: 2}


async def test_a_cancelled_caller_leaves_the_queue_and_never_runs() -> None:
    h = harness(max_batch_size=1, batching={})
    await h.submit(1, 0)
    gone = await h.submit(1, 1)
    kept = await h.submit(1, 2)
    gone.cancel()
    await turn()
    assert gone.cancelled()
    await h.complete()
    assert [b.tags for b in h.batches] == [[0], [2]]  # 1 was dropped, never executed
    await h.complete()
    await kept
    assert h.queue.queued == 0


async def test_preserve_ordering_releases_results_in_arrival_order() -> None:
    h = harness(instances=2, max_batch_size=1, batching={"preserve_ordering": True})
    first, second = await h.submit(1, 1), await h.submit(1, 2)
    assert len(h.batches) == 2
    await h.complete(1)  # the second finishes first ...
    await turn()
    assert not second.done()  # ... but waits for the first
    await h.complete(0)
    await turn()
    assert first.done() and second.done()


async def test_a_full_queue_refuses_with_resource_exhausted() -> None:
    h = harness(max_batch_size=1, batching={"max_queue_size": 2})
    await h.submit(1, 0)  # running: not queued
    await h.submit(1, 1)
    await h.submit(1, 2)
    refused = await h.submit(1, 3)
    assert code(refused) is ErrorCode.RESOURCE_EXHAUSTED
    await h.complete()
    assert not (await h.submit(1, 4)).done()  # room again


async def test_ragged_inputs_are_padded_to_their_bucket_and_batch_together() -> None:
    h = harness(batching={"ragged_buckets": {"x": [4, 8]}, "pad_value": -1})
    await h.submit(1, 0)
    await h.submit(1, 1, width=3)
    await h.submit(1, 2, width=4)
    await h.submit(1, 3, width=5)
    await h.complete()
    assert [b.tags for b in h.batches] == [[0], [1, 2]]
    assert h.batches[1].parts[0]["x"].tolist() == [[1, 1, 1, -1]]


async def test_close_refuses_new_work_and_waits_for_running_batches() -> None:
    h = harness(batching={})
    running = await h.submit(1, 1)
    closing = asyncio.create_task(h.queue.close())
    await turn()
    assert not closing.done()
    assert code(await h.submit(1, 2)) is ErrorCode.UNAVAILABLE
    await h.complete()
    await closing
    assert (await running)[0]["x"].tolist() == [[1, 1]]


async def test_a_failed_batch_fails_every_request_in_it() -> None:
    h = harness(batching={**DELAY_1S})
    tasks = [await h.submit(2, tag) for tag in (1, 2)]
    h.batches[0].fail(ValueError("boom"))
    await turn()
    await turn()
    assert [code(t) for t in tasks] == [ErrorCode.INTERNAL] * 2
    assert "boom" in str(tasks[0].exception())


# --- oversize requests -------------------------------------------------------------------


async def test_an_oversize_request_runs_as_a_short_stream_of_pieces() -> None:
    h = harness(batching={})
    rows = 40
    task = await h.submit(rows, 0)
    peak = 0
    while not task.done():
        # never more than instances + 1 pieces out: the queue stays short however many rows
        peak = max(peak, h.queue.queued + h.queue.running)
        await h.complete()
        await turn()
    assert peak == 2
    assert [b.counts for b in h.batches] == [[4]] * 10
    arrays, timings = await task
    assert arrays["x"].shape == (rows, 2) and timings.batch_size == rows


async def test_a_failed_piece_fails_the_request_and_cancels_the_rest() -> None:
    h = harness(instances=2, batching={})
    task = await h.submit(40, 0)
    assert h.queue.running == 2 and h.queue.queued == 1  # 3 pieces out of 10
    h.batches[0].fail(ServerError(ErrorCode.INTERNAL, "piece 1 failed"))
    await turn()  # the freed worker takes piece 3, already queued
    await turn()
    assert "piece 1 failed" in str(task.exception())
    await h.complete(1)
    await h.complete(2)
    # no piece past the window was ever queued, and none runs after the failure
    assert len(h.batches) == 3 and h.queue.queued == 0 and h.queue.running == 0


async def test_cancelling_an_oversize_request_cancels_its_pieces() -> None:
    h = harness(batching={})
    task = await h.submit(40, 0)
    task.cancel()
    await turn()
    await h.complete()
    assert len(h.batches) == 1 and h.queue.queued == 0


async def test_without_a_batcher_pieces_still_split_and_run_alone() -> None:
    h = harness(batching=None)
    task = await h.submit(6, 0)
    while not task.done():
        await h.complete()
        await turn()
    assert [b.counts for b in h.batches] == [[4], [2]]


# --- device slots ------------------------------------------------------------------------


async def test_a_busy_device_slot_holds_the_batch_until_it_is_granted() -> None:
    device, clock = DeviceScheduler("gpu", "fifo", slots=1), FakeClock()
    a = harness(device=device, clock=clock, batching={}, name="a")
    b = harness(device=device, clock=clock, batching={}, name="b")
    await a.submit(1, 1)
    await b.submit(1, 2)
    assert b.batches == [] and device.waiting(b.queue)
    await b.submit(1, 3)  # still waiting: no second request for a slot
    await a.complete()
    assert [x.tags for x in b.batches] == [[2, 3]] and not device.waiting(b.queue)


async def test_a_granted_slot_with_nothing_left_to_run_is_handed_on() -> None:
    device, clock = DeviceScheduler("gpu", "fifo", slots=1), FakeClock()
    a = harness(device=device, clock=clock, batching={}, name="a")
    b = harness(device=device, clock=clock, batching={}, name="b")
    c = harness(device=device, clock=clock, batching={}, name="c")
    await a.submit(1, 1)
    gone = await b.submit(1, 2)
    await c.submit(1, 3)
    gone.cancel()
    await turn()
    await a.complete()  # b is granted the slot, has nothing, passes it to c
    assert b.batches == [] and [x.tags for x in c.batches] == [[3]]


async def test_fair_scheduler_shares_the_device_by_weight() -> None:
    device, clock = DeviceScheduler("gpu", "fair", slots=1), FakeClock()
    heavy = harness(device=device, clock=clock, max_batch_size=1, batching={}, weight=3)
    light = harness(device=device, clock=clock, max_batch_size=1, batching={}, weight=1)
    for h in (heavy, light):
        for _ in range(2):
            await h.submit(1, 0)
    for _ in range(80):
        running = heavy if heavy.queue.running else light
        await running.complete(infer_ns=1000)
        await running.submit(1, 0)  # both always have work
    assert 2.8 <= len(heavy.batches) / len(light.batches) <= 3.2


async def test_edf_runs_the_earliest_deadline_first_and_sheds_the_hopeless() -> None:
    device, clock = DeviceScheduler("gpu", "edf", slots=1), FakeClock()
    holder = harness(device=device, clock=clock, max_batch_size=1, batching={}, name="h")
    late = harness(device=device, clock=clock, max_batch_size=1, batching={}, name="late")
    soon = harness(device=device, clock=clock, max_batch_size=1, batching={}, name="soon")
    await holder.submit(1, 0)
    await late.submit(1, 1, timeout=900)
    await soon.submit(1, 2, timeout=100)
    await holder.complete()
    assert len(soon.batches) == 1 and late.batches == []
    await soon.complete(infer_ns=1_000_000)  # soon learns that a batch takes 1 ms
    await late.complete()
    hopeless = await soon.submit(1, 3, timeout=500)  # 500 us < 1 ms: cannot make it
    assert code(hopeless) is ErrorCode.DEADLINE_EXCEEDED and len(soon.batches) == 1


# --- request options ---------------------------------------------------------------------


def test_request_options_apply_the_model_defaults() -> None:
    policy = DynamicBatching(default_timeout_us=7, priority_levels=3, default_priority_level=2)
    assert request_options({}, policy) == RequestOptions(7000, 2)
    assert request_options({"timeout": 5, "priority": 1}, policy) == RequestOptions(5000, 1)
    assert request_options({"priority": 4}, policy) == RequestOptions(7000, 2)
    assert request_options({"timeout": 1e3}, None) == RequestOptions(1_000_000, 0)
    assert request_options(None, DynamicBatching(priority_levels=3)).priority == 3


@pytest.mark.parametrize(
    "params",
    [{"timeout": -1}, {"timeout": "5"}, {"priority": True}, {"priority": 2**64}, {"timeout": 1.5}],
)
def test_request_options_refuse_what_is_not_an_integer_in_range(params: dict[str, Any]) -> None:
    with pytest.raises(ServerError) as info:
        request_options(params, None)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
