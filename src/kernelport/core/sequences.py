"""Sequence models (Triton's ``sequence_batching``): stateful models fed by correlation id.

A client marks a request with ``sequence_id`` (a non-zero integer or a non-empty string)
and, on the first and last request of a sequence, ``sequence_start`` / ``sequence_end``.
``Sequences`` stands where a model's queue stands (``ModelVersion.queue``):

- a sequence is bound to one instance at its start (the instance with the fewest live
  sequences) and every request of it runs there, in the order it arrived, so a model may
  keep each sequence's state in its instance, keyed by the correlation id;
- the model's control inputs are filled per request: START and END from the flags, READY
  true, CORRID the correlation id (Triton's ``control_input`` kinds);
- a sequence ends with its END request, or when no request came for
  ``max_sequence_idle_us``; a later request without START is refused.

Requests of different sequences bound to the same instance run together in one batch, one
request per sequence (the oldest waiting), up to ``max_batch_size`` rows, with each row's
control inputs its own; a sequence's next request waits for its previous one, as its state
must be updated first (Triton's "oldest" strategy, one batch at a time per instance). With
``strategy: direct`` each sequence keeps one batch slot instead (``core/sequence_slots.py``).

Implicit state (Triton's ``state``): the server keeps each sequence's state tensors. A
request is fed its sequence's state (the initial state on START) as each state's
``input_name``, taken when its batch starts, so it is the state its previous request left;
the model's ``output_name`` output becomes the next state and is not returned to the
client. Each row of a batch carries its own sequence's state. The state goes with the
sequence: dropped after its END request and when it is idle too long.

In a worker process (``execution: {mode: worker}``) each sequence is bound to one of the
process's instances the same way. The process dies with any state its model kept: a
sequence started before a restart is refused (UNAVAILABLE, START it again) unless its state
is implicit, which the server holds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernelport.core.backend import Arrays, RequestArrays
from kernelport.core.execution import Timings, WorkerPool
from kernelport.core.model_config import ModelConfig
from kernelport.core.sequence_config import SequenceControl, SequenceState
from kernelport.core.stats import ModelStats
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.types import datatype

#: a model's live sequences at most (each holds state in the model): new ones are refused
MAX_SEQUENCES = 4096


@dataclass(slots=True)
class _Sequence:
    worker: int
    last_ns: int
    #: the pool's worker-process restarts when it started (a restart loses model-kept state)
    restarts: int = 0
    #: implicit state: state input name -> the array its last request left (None: initial)
    state: Arrays | None = None
    #: direct: its batch slot on its instance (-1: waiting for one)
    slot: int = -1


@dataclass(slots=True)
class _Job:
    key: int | str
    feed: Arrays
    rows: int
    done: asyncio.Future[tuple[Arrays, Timings]]
    queued_ns: int
    sequence: _Sequence = field(repr=False)
    start: bool = False
    end: bool = False


class Sequences:
    """Binds sequences to instances and runs their requests in order."""

    announced = 0
    #: whether each request must be one row (direct: one batch slot per sequence)
    _one_row = False

    def __init__(
        self,
        config: ModelConfig,
        pool: WorkerPool,
        stats: ModelStats,
        model_dir: Path | None = None,
    ) -> None:
        assert config.sequence_batching is not None
        self.config = config
        self._pool = pool
        self._stats = stats
        self._controls = config.sequence_batching.control_inputs
        self._states = config.sequence_batching.states
        self._initial = {s.input_name: _initial(config.name, s, model_dir) for s in self._states}
        self._idle_ns = config.sequence_batching.max_sequence_idle_us * 1000
        self._live: dict[int | str, _Sequence] = {}
        self._load = [0] * len(pool.workers)  # live sequences per instance
        self._waiting: list[deque[_Job]] = [deque() for _ in pool.workers]
        self._busy = [False] * len(pool.workers)
        self.running = 0
        self.queued = 0

    async def submit(
        self, inputs: Arrays, rows: int, parameters: Mapping[str, Any] | None = None
    ) -> tuple[Arrays, Timings]:
        params = parameters or {}
        key = _correlation_id(self.config.name, params.get("sequence_id"))
        start = bool(params.get("sequence_start", False))
        end = bool(params.get("sequence_end", False))
        now = self._now()
        self._expire(now)
        sequence = self._live.get(key)
        if start:
            if sequence is not None:  # a restart of a live sequence: same instance, fresh
                sequence.last_ns, sequence.restarts = now, self._pool.restarts
            else:
                sequence = self._begin(key, now)
        elif sequence is None:
            raise invalid(
                f"inference request for sequence {key!r} to model '{self.config.name}' must "
                "specify the START flag on the first request of the sequence (or it was idle "
                f"longer than {self.config.sequence_batching.max_sequence_idle_us} us)"  # type: ignore[union-attr]
            )
        elif sequence.restarts != self._pool.restarts and not self._states:
            self._release(key)  # its instance's process died: the state it kept is gone
            raise ServerError(
                ErrorCode.UNAVAILABLE,
                f"sequence {key!r} of model '{self.config.name}' lost its state: the model's "
                "worker process restarted since the sequence started; START it again",
            )
        if (self._states or self._one_row) and self.config.batching and rows != 1:
            why = "its implicit state is per sequence" if self._states else "one slot each"
            raise invalid(
                f"inference request to model '{self.config.name}' must specify batch-size 1 "
                f"due to requirements of sequence batcher ({why})"
            )
        sequence.last_ns = now
        feed = inputs.carrying(inputs) if isinstance(inputs, RequestArrays) else dict(inputs)
        for control in self._controls:
            feed[control.name] = _control(control, start, end, key, rows, self.config.batching)
        future = asyncio.get_running_loop().create_future()
        job = _Job(key, feed, rows, future, now, sequence, start, end)
        self._enqueue(job, params)
        if end:  # released now (after its request is in line): a request that follows
            self._release(key)  # must START again
        return await job.done

    def _enqueue(self, job: _Job, parameters: Mapping[str, Any]) -> None:
        self._waiting[job.sequence.worker].append(job)
        self.queued += 1
        self._dispatch(job.sequence.worker)

    def _dispatch(self, index: int) -> None:
        """Start the instance's next batch if it is idle: the oldest waiting request of each
        sequence, up to max_batch_size rows (a sequence's next request waits for its
        previous one: its state must be updated first)."""
        if self._busy[index] or not self._waiting[index]:
            return
        limit = max(self.config.max_batch_size, 1)
        taken: list[_Job] = []
        keys: set[int | str] = set()
        rows = 0
        waiting = self._waiting[index]
        for job in list(waiting):
            if job.done.cancelled():  # its client went away while it waited
                waiting.remove(job)
                self.queued -= 1
                continue
            if job.key in keys:  # its sequence's earlier request goes first
                continue
            if taken and (not self.config.batching or rows + job.rows > limit):
                break
            taken.append(job)
            keys.add(job.key)
            rows += job.rows
        if not taken:
            return
        for job in taken:
            waiting.remove(job)
            if self._states:  # now: its previous request has left the state
                job.feed.update(self._state_feed(job))
        self.queued -= len(taken)
        self._busy[index] = True
        self.running += 1
        batch = self._pool.workers[index].submit_batch(
            [j.feed for j in taken], [j.rows for j in taken], self.config
        )
        batch.add_done_callback(lambda f: self._finished(index, taken, f))

    def _finished(self, index: int, taken: list[_Job], batch: asyncio.Future[Any]) -> None:
        self._busy[index] = False
        self.running -= 1
        error = batch.exception() if not batch.cancelled() else ServerError(
            ErrorCode.UNAVAILABLE, f"model '{self.config.name}': the batch was cancelled"
        )  # fmt: skip
        if error is not None:
            for job in taken:
                if not job.done.done():
                    job.done.set_exception(error)
            self._dispatch(index)
            return
        result = batch.result()
        rows = sum(j.rows for j in taken)
        self._stats.record_execution(rows, result.input_ns, result.infer_ns, result.output_ns)
        compute_ns = result.input_ns + result.infer_ns + result.output_ns
        now = self._now()
        for job, outputs in zip(taken, result.outputs, strict=True):
            if job.done.done():
                continue
            if isinstance(outputs, ServerError):
                job.done.set_exception(outputs)
                continue
            if self._states:
                try:
                    outputs = self._keep_state(job, outputs)
                except ServerError as exc:
                    job.done.set_exception(exc)
                    continue
            queue_ns = now - job.queued_ns - compute_ns
            timings = Timings(queue_ns, result.input_ns, result.infer_ns, result.output_ns, rows)
            job.done.set_result((outputs, timings))
        self._dispatch(index)

    def _now(self) -> int:
        return time.monotonic_ns()

    def _state_feed(self, job: _Job) -> Arrays:
        """The job's state inputs: its sequence's, or the initial state on START."""
        held = None if job.start else job.sequence.state
        if held is not None:
            return held
        if not self.config.batching:
            return dict(self._initial)
        return {name: array[np.newaxis] for name, array in self._initial.items()}

    def _keep_state(self, job: _Job, outputs: Arrays) -> Arrays:
        """Take the state outputs out of a request's outputs as its sequence's next state."""
        answer = dict(outputs)
        state: Arrays = {}
        for spec in self._states:
            value = answer.pop(spec.output_name, None)
            if value is None:
                raise ServerError(
                    ErrorCode.INTERNAL,
                    f"model '{self.config.name}' did not return its state output "
                    f"'{spec.output_name}'",
                )
            state[spec.input_name] = np.array(value)  # a copy: not a view of the whole batch
        job.sequence.state = None if job.end else state
        return answer

    def _begin(self, key: int | str, now: int) -> _Sequence:
        if len(self._live) >= MAX_SEQUENCES:
            raise invalid(
                f"model '{self.config.name}' has {MAX_SEQUENCES} live sequences: end some "
                "(sequence_end) before starting more"
            )
        sequence = self._place(now)
        self._live[key] = sequence
        return sequence

    def _place(self, now: int) -> _Sequence:
        """A new sequence, bound to the instance with the fewest live sequences."""
        worker = min(range(len(self._load)), key=self._load.__getitem__)
        self._load[worker] += 1
        return _Sequence(worker, now, self._pool.restarts)

    def _release(self, key: int | str) -> None:
        sequence = self._live.pop(key, None)
        if sequence is not None:
            self._load[sequence.worker] -= 1

    def _expire(self, now: int) -> None:
        stale = [k for k, s in self._live.items() if now - s.last_ns > self._idle_ns]
        for key in stale:
            self._release(key)

    @property
    def live(self) -> int:
        """Sequences started and neither ended nor idle past the limit."""
        self._expire(self._now())
        return len(self._live)

    async def close(self) -> None:
        """The instances belong to the pool, which the model version closes."""


def _initial(model: str, spec: SequenceState, model_dir: Path | None) -> np.ndarray[Any, Any]:
    """A state's value at START, batch dimension excluded: zeros (empty strings for BYTES)
    or the row-major bytes of ``<model>/initial_state/<data_file>``."""
    dt = datatype(spec.datatype)
    shape = spec.initial_dims
    start = spec.initial_state
    if start is None or not start.data_file:
        if dt.name == "BYTES":
            array = np.empty(shape, dtype=np.object_)
            array.fill(b"")
            return array
        return np.zeros(shape, dtype=dt.numpy)
    path = (model_dir or Path(".")) / "initial_state" / start.data_file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise invalid(f"model '{model}': initial state of '{spec.input_name}': {exc}") from None
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt.numpy).itemsize
    if len(data) != want:
        raise invalid(
            f"model '{model}': initial state file {path} holds {len(data)} bytes, "
            f"{spec.datatype} {list(shape)} needs {want}"
        )
    return np.frombuffer(data, dtype=dt.numpy).reshape(shape).copy()


def _correlation_id(model: str, value: Any) -> int | str:
    if isinstance(value, bool) or value in (None, "", 0):
        raise invalid(
            f"inference request to model '{model}' must specify a non-zero or non-empty "
            "correlation ID (parameter sequence_id)"
        )
    if isinstance(value, int | str):
        return value
    raise invalid(f"sequence_id must be an integer or a string, got {type(value).__name__}")


def _control(
    control: SequenceControl, start: bool, end: bool, key: int | str, rows: int, batching: bool
) -> np.ndarray[Any, Any]:
    dt = datatype(control.datatype)
    shape = (rows, 1) if batching else (1,)
    if control.kind == "corrid":
        if dt.name == "BYTES":
            array = np.empty(shape, dtype=np.object_)
            array.fill(str(key).encode())
            return array
        if isinstance(key, str):
            raise invalid(
                f"control input '{control.name}' is {dt.name}: sequence_id must be an integer"
            )
        return np.full(shape, key, dtype=dt.numpy)
    flag = {"start": start, "end": end, "ready": True}[control.kind]
    return np.full(shape, control.false_true[int(flag)], dtype=dt.numpy)
