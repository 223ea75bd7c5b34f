"""Triton's ``direct`` sequence strategy in process (``core/sequence_slots.py``): fake workers
the test completes and a fake clock the test advances, so nothing sleeps. Slot assignment,
padding rows, the delay and utilization triggers, slots freed by END and by idleness, and
STARTs that wait while every slot is taken. Over tritonclient:
tests/e2e/test_sequence_slots_e2e.py."""

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
from kernelport.core.execution import BatchResult, WorkerPool
from kernelport.core.model_config import ModelConfig, parse_model_config, triton_config
from kernelport.core.sequence_slots import DirectSequences
from kernelport.core.stats import ModelStats
from kernelport.errors import ErrorCode, ServerError

US = 1000  # ns


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
    instance: int
    parts: list[Arrays]
    future: asyncio.Future[BatchResult]

    def column(self, name: str) -> list[Any]:
        return [p[name].reshape(-1)[0] for p in self.parts]

    def complete(self) -> None:
        """Echo each row's inputs; with state, NEXT = STATE + X."""
        outputs = []
        for part in self.parts:
            out = dict(part)
            if "STATE" in part:
                out["NEXT"] = part["STATE"] + part["X"]
            outputs.append(out)
        self.future.set_result(BatchResult(outputs, 0, 1000, 0))


@dataclass
class FakeWorker:
    index: int
    log: list[Batch]

    def submit_batch(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        assert counts == [1] * len(parts)
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self.log.append(Batch(self.index, parts, future))
        return future


async def turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


@dataclass
class Harness:
    seqs: DirectSequences
    clock: FakeClock
    batches: list[Batch] = field(default_factory=list)

    async def send(self, key: int, x: int = 1, **flags: Any) -> asyncio.Task[Any]:
        batching = self.seqs.config.batching
        inputs = {
            "X": np.array([[x]] if batching else [x], np.int32),
            "T": np.array([[b"t"]] if batching else [b"t"], dtype=np.object_),
        }
        params = {"sequence_id": key, **{f"sequence_{k}": v for k, v in flags.items()}}
        if "sequence_timeout" in params:  # the usual request timeout (us), not a flag
            params["timeout"] = params.pop("sequence_timeout")
        if self.seqs.config.sequence_batching and self.seqs.config.sequence_batching.states:
            del inputs["T"]
        task = asyncio.create_task(self.seqs.submit(inputs, 1, params))
        await turn()
        return task

    async def run(self, batch: Batch) -> None:
        batch.complete()
        await turn()

    async def drain(self) -> None:
        """Complete batches until none is left running."""
        while pending := [b for b in self.batches if not b.future.done()]:
            await self.run(pending[0])


def _config(
    batch: int = 2, count: int = 2, states: bool = False, idle_us: int = 60_000_000, **direct: Any
) -> ModelConfig:
    seq: dict[str, Any] = {
        "max_sequence_idle_us": idle_us,
        "strategy": "direct",
        **direct,
        "control_inputs": [
            {"name": "START", "kind": "start"},
            {"name": "END", "kind": "end"},
            {"name": "READY", "kind": "ready", "false_true": [5, 7]},
            {"name": "CORRID", "kind": "corrid", "datatype": "UINT64"},
        ],
    }
    inputs = [{"name": "X", "datatype": "INT32", "dims": [1]}]
    if states:
        seq["states"] = [
            {"input_name": "STATE", "output_name": "NEXT", "datatype": "INT32", "dims": [1]}
        ]
    else:
        inputs.append({"name": "T", "datatype": "BYTES", "dims": [1]})
    raw = {
        "name": "m",
        "backend": "python",
        "max_batch_size": batch,
        "instance_count": count,
        "inputs": inputs,
        "outputs": [{"name": "X", "datatype": "INT32", "dims": [1]}],
        "sequence_batching": seq,
    }
    return parse_model_config(raw, "m")


def _harness(config: ModelConfig) -> Harness:
    clock = FakeClock()
    log: list[Batch] = []
    workers = [FakeWorker(i, log) for i in range(config.instance_group[0].count)]
    seqs = DirectSequences(config, WorkerPool(workers), ModelStats(), clock=clock)
    return Harness(seqs, clock, log)


async def test_each_sequence_keeps_its_slot_and_empty_rows_are_padding() -> None:
    h = _harness(_config())
    tasks = [await h.send(k, start=True) for k in (11, 12, 13, 14)]
    # The instance with the most free slots, its lowest free slot.
    assert h.seqs.slots == [[11, 13], [12, 14]]
    assert [(b.instance, b.column("CORRID")) for b in h.batches] == [(0, [11]), (1, [12])]
    await h.drain()
    # 13 and 14 waited for their instance: slot 1, with slot 0 a padding row.
    second = h.batches[2]
    assert second.column("CORRID") == [0, 13]
    assert second.column("READY") == [5, 7] and second.column("START") == [0, 1]
    assert second.column("END") == [0, 0] and second.column("X") == [0, 1]
    assert second.column("T") == [b"", b"t"]
    assert second.parts[0]["X"].shape == (1, 1) and second.parts[0]["T"].dtype == np.object_
    answers = [t.result()[0] for t in tasks]
    assert [int(a["CORRID"][0, 0]) for a in answers] == [11, 12, 13, 14]  # real rows only
    assert tasks[2].result()[1].batch_size == 2
    # Later requests land in the same rows, whatever the order they come in.
    later = [await h.send(k, x=k) for k in (14, 13, 12, 11)]
    await h.drain()
    for task, key in zip(later, (14, 13, 12, 11), strict=True):
        assert int(task.result()[0]["X"][0, 0]) == key
    rows = {
        int(cid): (b.instance, row)
        for b in h.batches[4:]
        for row, cid in enumerate(b.column("CORRID"))
        if cid
    }
    assert rows == {11: (0, 0), 13: (0, 1), 12: (1, 0), 14: (1, 1)}
    await h.seqs.close()


async def test_delay_waits_for_the_other_occupied_slots() -> None:
    h = _harness(_config(count=1, max_queue_delay_us=1000))
    await h.send(1, start=True)  # the only occupied slot is ready: runs at once
    await h.drain()
    await h.send(2, start=True)  # slot 0 (sequence 1) has nothing: wait up to 1 ms
    assert len(h.batches) == 1
    h.clock.advance(999 * US)
    assert len(h.batches) == 1
    h.clock.advance(1 * US)
    assert h.batches[-1].column("CORRID") == [0, 2]
    await h.drain()
    # Both slots ready: no wait.
    await h.send(2)
    assert len(h.batches) == 2
    await h.send(1)
    assert h.batches[-1].column("CORRID") == [1, 2]
    await h.drain()
    await h.seqs.close()


async def test_minimum_slot_utilization_runs_before_the_delay() -> None:
    h = _harness(_config(batch=4, count=1, max_queue_delay_us=10_000, minimum_slot_utilization=0.5))
    for key in (1, 2, 3):
        await h.send(key, start=True)
        h.clock.advance(10_000 * US)
        await h.drain()
    assert h.seqs.slots == [[1, 2, 3, None]]
    await h.send(1)  # 1 of 4 slots: waits
    assert len(h.batches) == 3
    await h.send(3)  # 2 of 4: half the slots, run now with slot 1 padding
    assert h.batches[-1].column("CORRID") == [1, 0, 3]
    await h.drain()
    await h.seqs.close()


async def test_start_waits_for_a_slot_freed_by_end() -> None:
    h = _harness(_config(count=1))
    first = await h.send(1, start=True)
    await h.send(2, start=True)
    waiting = await h.send(3, x=30, start=True)
    follow = await h.send(3, x=31)  # behind its START
    assert h.seqs.waiting_starts == 1 and h.seqs.live == 3
    await h.drain()
    assert not waiting.done() and first.done()
    ended = await h.send(1, x=10, end=True)
    assert h.seqs.slots == [[3, 2]] and h.seqs.waiting_starts == 0
    await h.drain()
    assert int(ended.result()[0]["X"][0, 0]) == 10
    assert int(waiting.result()[0]["X"][0, 0]) == 30
    assert int(follow.result()[0]["X"][0, 0]) == 31
    # Sequence 1's END ran in row 0 before sequence 3's START, in the same row.
    order = [(b.column("CORRID")[0], b.column("START")[0]) for b in h.batches[2:]]
    assert order == [(1, 0), (3, 1), (3, 0)]
    with pytest.raises(ServerError, match="must specify the START flag"):
        await h.seqs.submit({"X": np.ones((1, 1), np.int32)}, 1, {"sequence_id": 1})
    await h.seqs.close()


async def test_a_waiting_start_and_end_frees_the_slot_it_gets() -> None:
    h = _harness(_config(batch=1, count=1))
    await h.send(1, start=True)
    alone = await h.send(2, start=True, end=True)
    after = await h.send(3, start=True)
    assert h.seqs.waiting_starts == 2
    await h.send(1, end=True)
    await h.drain()
    assert alone.done() and after.done() and h.seqs.slots == [[3]]
    await h.seqs.close()


async def test_a_waiting_start_times_out() -> None:
    h = _harness(_config(batch=1, count=1))
    await h.send(1, start=True)
    waiting = await h.send(2, start=True, timeout=5000)  # the usual timeout parameter (us)
    h.clock.advance(5000 * US)
    await turn()
    with pytest.raises(ServerError) as caught:
        waiting.result()
    assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED and "free sequence slot" in str(
        caught.value
    )
    assert h.seqs.waiting_starts == 0 and h.seqs.live == 1 and h.seqs.queued == 0
    assert h.seqs._stats.rejected == {ErrorCode.DEADLINE_EXCEEDED.value: 1}
    await h.drain()
    await h.seqs.close()


async def test_idle_sequence_frees_its_slot_for_a_waiting_start() -> None:
    h = _harness(_config(batch=1, count=2, idle_us=1000))
    await h.send(1, start=True)
    h.clock.advance(500 * US)
    await h.send(2, start=True)
    await h.drain()
    waiting = await h.send(3, start=True)
    assert h.seqs.waiting_starts == 1
    h.clock.advance(500 * US)  # sequence 1 idle 1000 us: not yet past the limit
    assert h.seqs.waiting_starts == 1
    h.clock.advance(1 * US)
    await turn()
    assert h.seqs.slots == [[3], [2]]
    await h.drain()
    assert int(waiting.result()[0]["CORRID"][0, 0]) == 3
    with pytest.raises(ServerError, match="idle longer than 1000 us"):
        await h.seqs.submit({"X": np.ones((1, 1), np.int32)}, 1, {"sequence_id": 1})
    await h.seqs.close()


async def test_implicit_state_per_slot_and_padding_gets_the_initial_state() -> None:
    h = _harness(_config(count=1, states=True))
    await h.send(1, x=5, start=True)
    await h.send(2, x=3, start=True)
    await h.drain()
    await h.send(2, x=4)  # runs with slot 0 (sequence 1) padding
    pad = h.batches[-1]
    assert pad.column("CORRID") == [0, 2] and pad.column("STATE") == [0, 3]
    await h.drain()
    one = await h.send(1, x=1)
    two = await h.send(2, x=1)
    await h.drain()
    assert int(one.result()[0]["STATE"][0, 0]) == 5  # not the padding row's NEXT
    assert int(two.result()[0]["STATE"][0, 0]) == 7
    assert "NEXT" not in one.result()[0]
    await h.seqs.close()


async def test_model_that_does_not_batch_has_one_slot_per_instance() -> None:
    h = _harness(_config(batch=0, count=2))
    await h.send(1, start=True)
    await h.send(2, start=True)
    waiting = await h.send(3, start=True)
    assert h.seqs.slots == [[1], [2]] and h.seqs.waiting_starts == 1
    assert h.batches[0].parts[0]["START"].shape == (1,)
    await h.drain()
    await h.send(2, end=True)
    await h.drain()
    assert waiting.done() and h.seqs.slots == [[1], [3]]
    await h.seqs.close()


async def test_cancelled_and_failed_batches() -> None:
    h = _harness(_config(count=1))
    await h.send(1, start=True)
    gone = await h.send(1)
    gone.cancel()
    await turn()
    await h.drain()
    assert len(h.batches) == 1 and h.seqs.queued == 0  # the cancelled request never ran
    failing = await h.send(1)
    h.batches[-1].future.set_exception(ServerError(ErrorCode.INTERNAL, "boom"))
    await turn()
    with pytest.raises(ServerError, match="boom"):
        failing.result()
    await h.seqs.close()


async def test_requests_must_be_one_row() -> None:
    h = _harness(_config(count=1))
    x = np.zeros((2, 1), np.int32)
    with pytest.raises(ServerError, match=r"batch-size 1 .*one slot each"):
        await h.seqs.submit({"X": x}, 2, {"sequence_id": 1, "sequence_start": True})


def test_config_settings_and_rendering() -> None:
    config = _config(max_queue_delay_us=100, minimum_slot_utilization=0.5)
    rendered = triton_config(config)["sequence_batching"]
    assert rendered["direct"] == {
        "max_queue_delay_microseconds": 100,
        "minimum_slot_utilization": 0.5,
    }
    assert "oldest" not in rendered
    raw = config.model_dump(mode="json", exclude_defaults=True)
    raw["sequence_batching"]["strategy"] = "oldest"
    with pytest.raises(ServerError, match="settings of strategy: direct"):
        parse_model_config(raw, "m")
    del raw["sequence_batching"]["strategy"]
    raw["sequence_batching"].pop("max_queue_delay_us")
    raw["sequence_batching"].pop("minimum_slot_utilization")
    oldest = triton_config(parse_model_config(raw, "m"))["sequence_batching"]
    assert oldest["oldest"] == {} and "direct" not in oldest
