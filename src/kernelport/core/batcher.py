"""ModelQueue: the per-model dynamic batcher, queue policy and backpressure.

Requests wait in FIFO groups keyed by priority level and non-batch shape, so only requests
whose non-batch dimensions match share a batch. A batch is cut when it is full, when a
preferred size is reachable, or when the oldest request has waited ``max_queue_delay`` —
all driven by futures and one timer, never by polling. Cutting also needs an idle instance
and a slot from the device scheduler; while those are busy, requests accumulate, which is
what turns concurrency into batches. With no delay, a cut may still wait briefly when the
arrival process shows more requests are coming (``fill_batches``: see ``core/fill.py``, which
states the rule and its bounds). A request larger than ``max_batch_size`` is split here
into pieces that stream through the queue a few at a time.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from kernelport.core.backend import Arrays
from kernelport.core.clock import Cancellable, Clock, LoopClock
from kernelport.core.execution import BatchResult, BatchRunner, Timings, WorkerPool
from kernelport.core.fill import OVERLAP, ArrivalModel
from kernelport.core.model_config import ModelConfig
from kernelport.core.options import RequestOptions, request_options
from kernelport.core.pending import (
    Batch,
    GroupKey,
    Pending,
    Result,
    join_results,
    rows_up_to,
    settle,
    shape_key,
)
from kernelport.core.ragged import BucketPadder
from kernelport.core.scheduler import CostModel, DeviceScheduler
from kernelport.core.stats import ModelStats
from kernelport.errors import ErrorCode, ServerError

__all__ = ["ModelQueue", "RequestOptions", "request_options"]


class ModelQueue:
    """Queues, batches and runs one model version's requests on its workers.

    One method, :meth:`_dispatch`, starts batches. Every event that can let one start calls
    it: a request arriving, the delay timer firing, the device scheduler granting a slot
    (:meth:`granted`) and a batch finishing. The only state between events is the queue
    itself, the idle workers, the delay timer, and whether the device scheduler holds our
    request for a slot (``DeviceScheduler.waiting``).
    """

    def __init__(
        self,
        config: ModelConfig,
        pool: WorkerPool,
        stats: ModelStats,
        device: DeviceScheduler,
        weight: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.weight = weight
        self.cost = CostModel()
        self._pool = pool
        self._stats = stats
        self._device = device
        self._clock: Clock = clock if clock is not None else LoopClock()
        policy = config.dynamic_batching
        self._policy = policy
        self._default_options = request_options(None, policy)  # for requests that ask nothing
        self._batching = policy is not None
        self._max_rows = config.max_batch_size if policy is not None else 0
        self._delay_ns = (policy.max_queue_delay_us * 1000) if policy is not None else 0
        self._preferred = sorted(policy.preferred_batch_sizes) if policy is not None else []
        self._max_queue = policy.max_queue_size if policy is not None else 0
        # Inline only where the cost is a function of the row count: fixed non-batch dims.
        fixed = all(-1 not in t.dims for t in config.inputs)
        self._inline_ns = config.inline_below_us * 1000 if fixed else 0
        self._inline_alone_ns = config.inline_alone_below_us * 1000 if fixed else 0
        self._ordered = bool(policy and policy.preserve_ordering)
        # Batch fill replaces nothing a delay already does: with a delay the cut waits anyway.
        fill = policy is not None and policy.fill_batches and self._delay_ns == 0
        self._arrivals = ArrivalModel() if fill else None
        self._in_flight = 0  # requests inside submit(): queued, running or being answered
        #: requests accepted upstream (decoding, validating, preprocessing) and not yet
        #: submitted; the data plane counts them so a cut can wait for them (core/fill.py)
        self.announced = 0
        self._padder = BucketPadder(config)
        self._groups: dict[GroupKey, deque[Pending]] = {}
        self._queued = 0
        self._seq = itertools.count()
        self._timer: Cancellable | None = None
        self._closed = False
        self._drained: asyncio.Future[None] | None = None  # set by close(), resolved when empty
        self._running: set[asyncio.Future[BatchResult]] = set()
        # preserve_ordering: results are released strictly in arrival order
        self._release_order: deque[Pending] = deque()
        self._finished: dict[Pending, tuple[Result | None, Exception | None]] = {}

    # --- public ------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        """Batches executing now."""
        return len(self._running)

    async def submit(
        self, inputs: Arrays, rows: int, parameters: Mapping[str, Any] | None = None
    ) -> Result:
        """Queue a request of any row count and wait for its own output rows.

        ``parameters`` may carry ``timeout`` (us) and ``priority`` (see :func:`request_options`).
        A request above ``max_batch_size`` (of a model that batches) runs as pieces that
        are joined back.
        """
        self._admit()  # refusing the request comes before judging its parameters
        if parameters is None or ("timeout" not in parameters and "priority" not in parameters):
            options = self._default_options  # what request_options() would say, made once
        else:
            options = request_options(parameters, self._policy)
        if self._arrivals is not None:
            self._arrivals.arrived(self._clock.now_ns(), self._in_flight + self.announced)
        self._in_flight += 1
        try:
            # config.batching, not self._batching: without a dynamic batcher pieces run alone
            if self.config.batching and rows > self.config.max_batch_size:
                return await self._split(inputs, rows, options)
            return await self._enqueue(inputs, rows, options)
        finally:
            self._in_flight -= 1

    async def close(self) -> None:
        """Stop taking requests; let queued and running ones finish."""
        self._closed = True
        if self._queued or self._running:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self._timer is not None:
            self._timer.cancel()
        self._device.forget(self)

    # --- admission ---------------------------------------------------------------------

    def _admit(self) -> None:
        if self._closed:
            raise ServerError(ErrorCode.UNAVAILABLE, f"model '{self.config.name}' is unloading")
        if self._max_queue and self._queued >= self._max_queue:
            raise ServerError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"model '{self.config.name}' queue is full "
                f"({self._queued} requests, max_queue_size {self._max_queue})",
            )

    def _enqueue(
        self, inputs: Arrays, rows: int, options: RequestOptions
    ) -> asyncio.Future[Result]:
        """Queue one admitted request of at most ``max_batch_size`` rows; its future gets its
        rows."""
        if self._padder:
            inputs = self._padder.pad(inputs)
        now = self._clock.now_ns()
        timeout_ns = options.timeout_ns
        if not self._groups and self._starts_at_once(rows):
            # Fast path: nothing queued, an instance idle, a device slot granted. It starts
            # now, so it needs no group, shape key or timeout timer.
            pending = Pending(
                inputs,
                rows,
                (options.priority, ()),
                next(self._seq),
                now,
                now + timeout_ns if timeout_ns else math.inf,
                asyncio.get_running_loop().create_future(),
            )
            if self._ordered:
                self._release_order.append(pending)
            self._launch(Batch([pending], rows, now), self._pool.take_idle())
            return pending.future
        pending = Pending(
            inputs,
            rows,
            (options.priority, shape_key(inputs, self._batching)),
            next(self._seq),
            now,
            now + timeout_ns if timeout_ns else math.inf,
            asyncio.get_running_loop().create_future(),
        )
        if timeout_ns:
            pending.timer = self._clock.call_later(
                timeout_ns / 1e9, functools.partial(self._expire, pending)
            )
        self._groups.setdefault(pending.key, deque()).append(pending)
        self._queued += 1
        if self._ordered:
            self._release_order.append(pending)
        self._dispatch()
        return pending.future

    async def _split(self, inputs: Arrays, rows: int, options: RequestOptions) -> Result:
        """Run a request larger than max_batch_size as pieces, and join the pieces back.

        Pieces go to the queue as a stream, a few at a time (enough to keep every instance
        busy): the queue never holds thousands of them, so each batch cut stays cheap, other
        requests interleave with a large one, and max_queue_size counts it fairly. When a
        piece fails or the caller goes away, the pieces still out are cancelled.
        """
        step = self.config.max_batch_size
        window = len(self._pool.workers) + 1
        running: deque[asyncio.Future[Result]] = deque()
        results: list[Result] = []
        try:
            for start in range(0, rows, step):
                if start:  # each further piece is admitted again: a long request yields
                    self._admit()
                piece = {name: array[start : start + step] for name, array in inputs.items()}
                running.append(self._enqueue(piece, min(step, rows - start), options))
                if len(running) >= window:
                    results.append(await running.popleft())
            while running:
                results.append(await running.popleft())
        finally:
            for future in running:  # a piece failed or the caller went away
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: a sibling's error is already reported
                future.cancel()
        return join_results(results, rows)

    # --- SlotClient --------------------------------------------------------------------

    def wake(self) -> None:
        """The workers can take batches again (a restarted worker process): start some."""
        self._dispatch()

    def granted(self) -> None:
        """The device scheduler gave us the slot we waited for."""
        self._run_on_slot()
        self._dispatch()

    def earliest_deadline(self) -> float:
        return min((q[0].deadline_ns for q in self._groups.values() if q), default=math.inf)

    # --- the dispatch loop -------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start batches while there is work, an idle worker and a device slot.

        Returns when one is missing, or while the batch should wait to grow; the event that
        supplies it calls here again: a new request, the delay timer, ``granted()`` (the
        scheduler keeps our place in its line meanwhile), or a batch finishing (which frees
        a worker and its slot).
        """
        while self._queued and not self._device.waiting(self):
            if self._pool.idle_count:
                wait_ns = self._wait_ns()
                if wait_ns > 0:
                    self._arm_timer(wait_ns)
                    return
            elif not self._ahead_ready():
                return
            if not self._device.acquire(self):
                return  # the scheduler calls granted() when our turn comes
            self._run_on_slot()

    def _ahead_ready(self) -> bool:
        """Every worker is busy, one can hold a batch behind its running one (a worker
        process), and the head batch cannot grow: send it now, so the process starts it
        the moment the running one ends instead of a round trip to us later. A batch that
        could still grow waits here for an idle worker, as before."""
        if not self._pool.ahead_count:
            return False
        head = self._head()
        return head is not None and (
            not self._batching or rows_up_to(head, self._max_rows) >= self._max_rows
        )

    def _run_on_slot(self) -> None:
        """We hold a device slot: start a batch on it, or hand it back when none is left
        to cut (its requests were cancelled, timed out or shed while we waited)."""
        if not self._start_batch():
            self._device.release(self, 0)

    def _ready(self) -> bool:
        """A batch would start now if a slot were free."""
        return (
            bool(self._queued)
            and bool(self._pool.idle_count)
            and not self._device.waiting(self)
            and self._wait_ns() == 0
        )

    def _head(self) -> deque[Pending] | None:
        best: deque[Pending] | None = None
        for group in self._groups.values():
            while group and group[0].future.done():  # cancelled by a departed client
                self._drop(group.popleft())
            if group and (
                best is None or (group[0].key[0], group[0].seq) < (best[0].key[0], best[0].seq)
            ):
                best = group
        return best

    def _wait_ns(self) -> int:
        """0 to cut a batch now, else how long to wait for it to grow."""
        head = self._head()
        if head is None or not self._batching:
            return 0
        arrivals = self._arrivals
        if self._delay_ns == 0 and arrivals is None:
            return 0
        rows = rows_up_to(head, self._max_rows)
        if rows >= self._max_rows or any(p == rows for p in self._preferred):
            return 0
        if self._preferred and rows >= self._preferred[0] and self._pool.idle_count:
            return 0  # a preferred size can be formed now
        now = self._clock.now_ns()
        waited = now - head[0].enqueued_ns
        if arrivals is None:
            return max(0, self._delay_ns - waited)
        hold = arrivals.hold_ns(self.cost.estimate(1), self.announced)
        # Leave the oldest request time to run before its timeout.
        hold = min(hold, head[0].deadline_ns - head[0].enqueued_ns - self.cost.estimate(rows + 1))
        return max(0, math.ceil(hold - waited))

    def _arm_timer(self, wait_ns: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._clock.call_later(wait_ns / 1e9, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take(self) -> Batch | None:
        head = self._head()
        if head is None:
            return None
        key = head[0].key
        limit = self._max_rows if self._batching else head[0].rows
        available = rows_up_to(head, limit)  # exact below limit, which is all that matters
        if self._preferred and available < limit:
            fits = [p for p in self._preferred if p <= available]
            limit = fits[-1] if fits else limit
        limit = max(limit, head[0].rows)  # the oldest request always fits: progress guaranteed
        taken: list[Pending] = []
        rows = 0
        now = self._clock.now_ns()
        estimate = (
            self.cost.estimate(min(available, limit)) if self._device.discipline == "edf" else 0
        )
        while head and rows + head[0].rows <= limit:
            pending = head.popleft()
            if pending.future.done():
                self._drop(pending)
                continue
            if pending.deadline_ns < now + estimate:
                # edf: it cannot finish in time; shed it rather than waste the device.
                self._fail(pending, ErrorCode.DEADLINE_EXCEEDED, "cannot meet its deadline")
                continue
            self._dequeue(pending)
            taken.append(pending)
            rows += pending.rows
            if not self._batching:
                break
        if not head:
            del self._groups[key]
        return Batch(taken, rows, now) if taken else None

    def _starts_at_once(self, rows: int) -> bool:
        """With nothing queued: would this request be cut alone at once? If so, the device
        slot is taken for it. (edf may shed a request at the cut: it keeps the full path.)"""
        if not self._pool.idle_count or self._device.waiting(self):
            return False
        if self._device.discipline == "edf" or self._delay_ns:
            return False
        arrivals = self._arrivals
        if (
            arrivals is not None
            and rows < self._max_rows
            and arrivals.hold_ns(self.cost.estimate(1), self.announced)
        ):
            return False  # it may wait for company: the full path decides
        return self._device.acquire(self)

    def _start_batch(self) -> bool:
        idle = bool(self._pool.idle_count)
        if not idle and not self._ahead_ready():
            return False
        batch = self._take()
        if batch is None:
            return False
        self._launch(batch, self._pool.take_idle() if idle else self._pool.take_ahead())
        return True

    def _launch(self, batch: Batch, worker: BatchRunner) -> None:
        """Run ``batch`` on ``worker`` (idle, or a process worker taking it ahead)."""
        parts = [p.inputs for p in batch.requests]
        counts = [p.rows for p in batch.requests]
        # Nothing else of the model waits, and arrivals do not overlap (at c=32 the queue
        # can be empty while many requests are still being parsed: those are not alone).
        arrivals = self._arrivals
        alone = self._in_flight <= len(batch.requests) and (
            arrivals is None or arrivals.overlap < OVERLAP
        )
        if self._pool.inline and not self._running and self._short(batch.rows, alone):
            future = worker.run_now(parts, counts, self.config)
        else:
            future = worker.submit_batch(parts, counts, self.config)
        # A done-callback rather than a task per batch: one less trip through the loop.
        self._running.add(future)
        future.add_done_callback(functools.partial(self._finish, batch, worker))

    def _short(self, rows: int, alone: bool) -> bool:
        """The learned cost of ``rows`` says the batch may run on the loop (never unknown):
        at most ``inline_below_us``, or ``inline_alone_below_us`` when it is the model's only
        work in flight.

        A run far over the threshold (a preempted core, a cost that depends on the data)
        lifts the moving average over it, so the next batches of that size go to the thread
        until runs there bring it back down."""
        cost = self.cost.estimate(rows)
        return 0 < cost <= max(self._inline_ns, self._inline_alone_ns if alone else 0)

    def _finish(
        self, batch: Batch, worker: BatchRunner, future: asyncio.Future[BatchResult]
    ) -> None:
        self._running.discard(future)
        busy = 0
        try:
            result = future.result()
            busy = result.infer_ns
            self.cost.observe(batch.rows, result.infer_ns)
            self._stats.record_execution(
                batch.rows, result.input_ns, result.infer_ns, result.output_ns
            )
            for pending, outputs in zip(batch.requests, result.outputs, strict=True):
                if isinstance(outputs, ServerError):  # the model failed this request alone
                    self._resolve(pending, None, outputs)
                    continue
                timings = Timings(
                    batch.started_ns - pending.enqueued_ns + result.waited_ns,
                    result.input_ns,
                    result.infer_ns,
                    result.output_ns,
                    batch.rows,
                )
                self._resolve(pending, (outputs, timings), None)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, ServerError)
                else ServerError(ErrorCode.INTERNAL, f"model '{self.config.name}' failed: {exc}")
            )
            for pending in batch.requests:
                self._resolve(pending, None, error)
        finally:
            self._pool.release(worker)
            spent = busy or (self._clock.now_ns() - batch.started_ns)
            # With another batch ready we compete for the slot we free (otherwise a busy
            # model could never win two turns in a row); winning it calls granted() now.
            self._device.release(self, spent, requeue=self._ready())
            self._dispatch()
            self._notify_if_drained()

    # --- request bookkeeping -----------------------------------------------------------

    def _dequeue(self, pending: Pending) -> None:
        self._queued -= 1
        if pending.timer is not None:
            pending.timer.cancel()
        self._notify_if_drained()

    def _notify_if_drained(self) -> None:
        drained = self._drained
        if drained is not None and not self._queued and not self._running and not drained.done():
            drained.set_result(None)

    def _drop(self, pending: Pending) -> None:
        self._dequeue(pending)
        self._resolve(pending, None, None)

    def _expire(self, pending: Pending) -> None:
        group = self._groups.get(pending.key)
        if group is None or pending not in group:
            return  # already running
        group.remove(pending)
        if not group:
            del self._groups[pending.key]
        pending.timer = None
        self._fail(pending, ErrorCode.DEADLINE_EXCEEDED, "timed out in the queue")

    def _fail(self, pending: Pending, code: ErrorCode, why: str) -> None:
        self._dequeue(pending)
        self._stats.record_rejection(code.value)
        self._resolve(
            pending, None, ServerError(code, f"model '{self.config.name}': request {why}")
        )

    def _resolve(self, pending: Pending, value: Result | None, error: Exception | None) -> None:
        if not self._ordered:
            settle(pending, value, error)
            return
        pending.inputs = {}  # free request memory while it waits for its turn
        self._finished[pending] = (value, error)
        while self._release_order and self._release_order[0] in self._finished:
            head = self._release_order.popleft()
            settle(head, *self._finished.pop(head))
