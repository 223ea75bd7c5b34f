"""A queued request, a cut batch, and the small pure helpers of the batcher."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import numpy as np

from kernelport.core.backend import Arrays
from kernelport.core.clock import Cancellable
from kernelport.core.execution import Timings

GroupKey = tuple[int, tuple[tuple[str, tuple[int, ...]], ...]]  # (priority level, shapes)
Result = tuple[Arrays, Timings]


# Both are made for every request or batch: their __init__ is spelled out so that mypyc
# compiles it (see ``kernelport.types.Tensor``).


@dataclass(eq=False, slots=True, init=False)
class Pending:
    """One queued request and the future its caller awaits."""

    inputs: Arrays
    rows: int
    key: GroupKey
    seq: int
    enqueued_ns: int
    deadline_ns: float  # clock ns by which it must start executing; inf = none
    future: asyncio.Future[Result]
    timer: Cancellable | None

    def __init__(
        self,
        inputs: Arrays,
        rows: int,
        key: GroupKey,
        seq: int,
        enqueued_ns: int,
        deadline_ns: float,
        future: asyncio.Future[Result],
        timer: Cancellable | None = None,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.seq = seq
        self.enqueued_ns = enqueued_ns
        self.deadline_ns = deadline_ns
        self.future = future
        self.timer = timer


@dataclass(slots=True, init=False)
class Batch:
    requests: list[Pending]
    rows: int
    started_ns: int

    def __init__(self, requests: list[Pending], rows: int, started_ns: int) -> None:
        self.requests = requests
        self.rows = rows
        self.started_ns = started_ns


def shape_key(inputs: Arrays, batching: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    skip = 1 if batching else 0
    return tuple(sorted((name, tuple(a.shape[skip:])) for name, a in inputs.items()))


def join_results(results: list[Result], rows: int) -> Result:
    """One response from a split request's pieces, in order."""
    joined = {name: np.concatenate([r[0][name] for r in results]) for name in results[0][0]}
    t = [r[1] for r in results]
    return joined, Timings(
        max(x.queue_ns for x in t),
        sum(x.input_ns for x in t),
        sum(x.infer_ns for x in t),
        sum(x.output_ns for x in t),
        rows,
    )


def rows_up_to(group: deque[Pending], cap: int) -> int:
    """Rows queued in ``group``, counted only until they reach ``cap``.

    Summing a whole group on every batch cut made a long queue (a split request's pieces)
    quadratic; a batch never needs to know more than whether ``cap`` rows are waiting.
    """
    rows = 0
    for pending in group:
        rows += pending.rows
        if rows >= cap:
            break
    return rows


def settle(pending: Pending, value: Result | None, error: Exception | None) -> None:
    if pending.future.done():
        return
    if error is not None:
        pending.future.set_exception(error)
    elif value is not None:
        pending.future.set_result(value)
    else:
        pending.future.cancel()
