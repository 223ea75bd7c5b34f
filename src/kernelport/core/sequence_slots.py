"""Triton's ``direct`` sequence-batching strategy: each sequence owns one batch slot.

Each instance has ``max_batch_size`` slots (1 when the model does not batch). A sequence is
given one (instance, slot) at its START, on the instance with the most free slots, and every
request of it runs in that row of the instance's batches, so a model may keep its
sequences' state by batch row (as models written for Triton's ``direct`` do) as well as by
correlation id. A slot frees when its sequence's END request is in line, or when the
sequence was idle longer than ``max_sequence_idle_us``.

When every slot of every instance is taken, a new START waits, first come first served,
until one frees. Requests that follow it wait with it. The wait is queue time, bounded by
the request's ``timeout`` (then DEADLINE_EXCEEDED, and the sequence never started) and by
``MAX_SEQUENCES`` (live and waiting sequences together).

An instance's batch holds rows 0..k, k the highest slot with a request ready. A slot below
k with none is padding: its READY (and START, END) control inputs are false, CORRID zero,
its inputs zeros of the batch's shape (empty strings for BYTES) and its implicit state the
initial one; its outputs, state included, are dropped. An idle instance runs its next batch
when every occupied slot has a request ready, when ``minimum_slot_utilization`` of its slots
have one, or when the oldest ready request has waited ``max_queue_delay_us``.

Everything else (control inputs, implicit state, worker processes) is ``core/sequences.py``'s.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernelport.core.backend import Arrays
from kernelport.core.clock import Cancellable, Clock, LoopClock
from kernelport.core.execution import WorkerPool
from kernelport.core.model_config import ModelConfig
from kernelport.core.options import request_options
from kernelport.core.sequences import Sequences, _Job, _Sequence
from kernelport.core.stats import ModelStats
from kernelport.errors import ErrorCode, ServerError


@dataclass(slots=True)
class _Parked:
    """A sequence waiting for a slot, with the requests it sent meanwhile."""

    key: int | str
    sequence: _Sequence
    jobs: list[_Job] = field(default_factory=list)
    #: its END is in line: the slot it gets frees once its requests are placed
    ended: bool = False
    timer: Cancellable | None = None


class DirectSequences(Sequences):
    """Sequences bound to fixed batch slots (Triton's ``direct`` strategy)."""

    _one_row = True

    def __init__(
        self,
        config: ModelConfig,
        pool: WorkerPool,
        stats: ModelStats,
        model_dir: Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(config, pool, stats, model_dir)
        seq = config.sequence_batching
        assert seq is not None
        self._clock: Clock = clock or LoopClock()
        self._delay_ns = seq.max_queue_delay_us * 1000
        self._utilization = seq.minimum_slot_utilization
        width = config.max_batch_size if config.batching else 1
        self._owners: list[list[_Sequence | None]] = [[None] * width for _ in pool.workers]
        self._rows: list[list[deque[_Job]]] = [
            [deque() for _ in range(width)] for _ in pool.workers
        ]
        self._backlog: deque[_Parked] = deque()
        self._delays: list[Cancellable | None] = [None] * len(pool.workers)
        self._idle_timer: Cancellable | None = None

    def _now(self) -> int:
        return self._clock.now_ns()

    @property
    def slots(self) -> list[list[int | str | None]]:
        """Per instance, the correlation id in each slot (None: free)."""
        keys = {id(s): k for k, s in self._live.items()}
        return [[None if s is None else keys.get(id(s)) for s in row] for row in self._owners]

    @property
    def waiting_starts(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._backlog)

    def _place(self, now: int) -> _Sequence:
        sequence = _Sequence(-1, now, self._pool.restarts)
        free = self._free()
        if free is not None and not self._backlog:  # first come, first served
            self._seat(sequence, *free)
        return sequence

    def _free(self) -> tuple[int, int] | None:
        """The lowest free slot of the instance with the most free slots."""
        best: tuple[int, int] | None = None
        most = 0
        for index, owners in enumerate(self._owners):
            free = owners.count(None)
            if free > most:
                best, most = (index, owners.index(None)), free
        return best

    def _seat(self, sequence: _Sequence, index: int, slot: int) -> None:
        sequence.worker, sequence.slot = index, slot
        self._owners[index][slot] = sequence

    def _enqueue(self, job: _Job, parameters: Mapping[str, Any]) -> None:
        self.queued += 1
        sequence = job.sequence
        if sequence.slot >= 0:
            self._rows[sequence.worker][sequence.slot].append(job)
            self._dispatch(sequence.worker)
            return
        parked = next((p for p in reversed(self._backlog) if p.sequence is sequence), None)
        if parked is None:
            parked = _Parked(job.key, sequence)
            self._backlog.append(parked)
            timeout_ns = request_options(parameters, None).timeout_ns
            if timeout_ns:
                expire = functools.partial(self._give_up, parked)
                parked.timer = self._clock.call_later(timeout_ns / 1e9, expire)
            self._watch_idle()
        parked.jobs.append(job)

    def _release(self, key: int | str) -> None:
        sequence = self._live.pop(key, None)
        if sequence is None:
            return
        if sequence.slot < 0:
            for parked in self._backlog:
                if parked.sequence is sequence:
                    parked.ended = True
            return
        self._owners[sequence.worker][sequence.slot] = None
        self._take_backlog()

    def _take_backlog(self) -> None:
        """Seat waiting sequences in the slots that are free, oldest first."""
        touched: set[int] = set()
        while self._backlog and (free := self._free()) is not None:
            parked = self._backlog.popleft()
            if parked.timer is not None:
                parked.timer.cancel()
            sequence = parked.sequence
            self._seat(sequence, *free)
            sequence.last_ns = self._now()  # idle from when it could run
            self._rows[free[0]][free[1]].extend(parked.jobs)
            if parked.ended or self._live.get(parked.key) is not sequence:
                self._owners[free[0]][free[1]] = None  # in line behind nothing: free again
            touched.add(free[0])
        for index in touched:
            self._dispatch(index)

    def _give_up(self, parked: _Parked) -> None:
        """The request that started a waiting sequence timed out: the sequence never began."""
        if parked not in self._backlog:
            return
        self._backlog.remove(parked)
        if self._live.get(parked.key) is parked.sequence:
            del self._live[parked.key]
        error = ServerError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"sequence {parked.key!r} of model '{self.config.name}' timed out waiting for a "
            "free sequence slot (every slot of every instance is taken)",
        )
        for job in parked.jobs:
            self.queued -= 1
            self._stats.record_rejection(error.code.value)
            if not job.done.done():
                job.done.set_exception(error)

    def _expire(self, now: int) -> None:
        # Waiting sequences are not idle: they cannot run yet.
        stale = [
            key
            for key, sequence in self._live.items()
            if sequence.slot >= 0 and now - sequence.last_ns > self._idle_ns
        ]
        for key in stale:
            self._release(key)

    def _watch_idle(self) -> None:
        """While STARTs wait, free the slot of the first sequence to go idle when it does."""
        if self._idle_timer is not None or not self._backlog:
            return
        seated = [s.last_ns for s in self._live.values() if s.slot >= 0]
        if not seated:
            return
        delay_ns = min(seated) + self._idle_ns + 1 - self._now()
        self._idle_timer = self._clock.call_later(max(delay_ns, 0) / 1e9, self._idle_due)

    def _idle_due(self) -> None:
        self._idle_timer = None
        self._expire(self._now())
        self._watch_idle()

    def _dispatch(self, index: int) -> None:
        """Run the instance's next batch if it is idle and the batch is due."""
        if self._busy[index]:
            return
        rows = self._rows[index]
        for line in rows:
            while line and line[0].done.done():  # its client went away, or it timed out
                line.popleft()
                self.queued -= 1
        ready = [slot for slot, line in enumerate(rows) if line]
        if not ready or not self._due(index, ready):
            return
        if (timer := self._delays[index]) is not None:
            timer.cancel()
            self._delays[index] = None
        taken = [line.popleft() if line else None for line in rows[: ready[-1] + 1]]
        jobs = [job for job in taken if job is not None]
        for job in jobs:
            if self._states:  # now: its previous request has left the state
                job.feed.update(self._state_feed(job))
        batch = [job if job is not None else self._padding(index, jobs[0]) for job in taken]
        self.queued -= len(jobs)
        self._busy[index] = True
        self.running += 1
        future = self._pool.workers[index].submit_batch(
            [j.feed for j in batch], [j.rows for j in batch], self.config
        )
        future.add_done_callback(lambda f: self._finished(index, batch, f))

    def _due(self, index: int, ready: list[int]) -> bool:
        rows = self._rows[index]
        owners = self._owners[index]
        if all(rows[slot] for slot, owner in enumerate(owners) if owner is not None):
            return True
        if self._utilization and len(ready) >= self._utilization * len(owners):
            return True
        oldest = min(rows[slot][0].queued_ns for slot in ready)
        wait_ns = oldest + self._delay_ns - self._now()
        if wait_ns <= 0:
            return True
        if self._delays[index] is None:
            due = functools.partial(self._delay_passed, index)
            self._delays[index] = self._clock.call_later(wait_ns / 1e9, due)
        return False

    def _delay_passed(self, index: int) -> None:
        self._delays[index] = None
        self._dispatch(index)

    def _padding(self, index: int, like: _Job) -> _Job:
        """An empty slot's row: READY false, zeros like a real row; nobody waits for it (its
        future is cancelled, so its outputs and state are dropped)."""
        feed: Arrays = {name: _blank(array) for name, array in like.feed.items()}
        for control in self._controls:
            if control.kind != "corrid":
                feed[control.name] = np.full_like(feed[control.name], control.false_true[0])
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.cancel()
        pad = _Job(0, feed, like.rows, done, like.queued_ns, _Sequence(index, 0), start=True)
        if self._states:
            feed.update(self._state_feed(pad))  # the initial state
        return pad

    async def close(self) -> None:
        for timer in (*self._delays, self._idle_timer, *(p.timer for p in self._backlog)):
            if timer is not None:
                timer.cancel()


def _blank(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Zeros shaped like ``array``; empty strings for BYTES."""
    if array.dtype == np.object_:
        return np.full(array.shape, b"", dtype=np.object_)
    return np.zeros_like(array)
