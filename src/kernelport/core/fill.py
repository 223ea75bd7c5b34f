"""Batch fill: hold a batch briefly when the arrival process says more requests are coming.

With ``max_queue_delay_us`` 0 the batcher cuts whatever is queued the moment an instance is
idle. When a front end hands requests over one at a time (each costs more of the core to
decode than the model costs to run one row), the instance is idle at every arrival and every
batch has one row, even with 32 clients waiting. :class:`ArrivalModel` learns, per model
queue, two things about arrivals and from them how long a cut may wait:

- **overlap**: the share of recent arrivals that found another request of the model in
  flight (submitted to the queue, not yet answered) or announced (being received or
  decoded by a front end, or preprocessed: :class:`Announcement`; not yet queued). In a
  closed loop with one client a request arrives only after the previous one was answered,
  so every sample is 0 and the share stays exactly 0: **at concurrency 1 the batcher never
  waits.** With several clients most arrivals find company.
- **gap**: the recent inter-arrival time (an exponential moving average).

A cut with room left in the batch (not full, no preferred size reachable) waits when

- a request is announced (it is being decoded or preprocessed and will be queued soon), or
- the overlap share is at least :data:`OVERLAP` *and* the gap is at most the hold cap, i.e.
  the next request is expected within a wait the bound allows,

for at most ``min(1.5 x gap, cap)`` from the oldest request's arrival (announced: ``cap``;
half a gap more than the mean, since arrivals jitter about it), where
``cap = single-row run cost x`` :data:`FACTOR` from the queue's :class:`CostModel`. The wait ends as
soon as the batch is full or a preferred size is reachable (every arrival re-runs the cut),
and never runs past a request's timeout less the batch's expected run time. While the
model's cost is unknown (no batch has run yet) nothing waits.

Why it is worth it: the held request costs nothing of the core while it waits, and the
requests that join it share one model run, so when the core is busy decoding the next
requests (that is what overlap shows) a batch of k costs ``C(k)`` instead of ``k x C(1)``.
What bounds it: a request waits at most ``cap`` beyond what it would have, so when the
evidence is wrong (the load just stopped) the last request pays at most ``factor``
single-row runs of latency, once: it is not stranded, the timer cuts it.
"""

from __future__ import annotations

import math
from typing import Protocol

#: weight of the newest arrival in the moving averages (about the last 8 arrivals count)
ALPHA = 0.125
#: share of recent arrivals that must have found company before a cut waits
OVERLAP = 0.25
#: the hold cap in single-row runs. Measured on mlp over grpcio at c=32 (one core): a cap of
#: 1-2 runs caught almost nothing (grpcio's requests arrive ~5 runs apart), 4 gave mean
#: batch 2.3 and +43% infer/s, 8 no more than 4.
FACTOR = 4.0
#: the hold in mean gaps: arrivals jitter about the mean, so one gap would miss half of them
SLACK = 1.5


class Counted(Protocol):
    """A model queue's count of announced requests."""

    announced: int


class Announcement:
    """One request counted in its model queue's ``announced`` until :meth:`release`.

    A front end takes one (``DataPlane.announce``) as soon as it knows a request's model,
    and releases it just before the request is submitted to the queue (then the request
    is in flight, counted there) or when it fails first. :meth:`release` is idempotent,
    so a front end may release on its path to the queue and again in a ``finally``.
    """

    __slots__ = ("_queue",)

    def __init__(self, queue: Counted) -> None:
        queue.announced += 1
        self._queue: Counted | None = queue

    def release(self) -> None:
        queue = self._queue
        if queue is not None:
            self._queue = None
            # No cut is re-run here: released on the way to submit(), that submit re-runs
            # it with the request queued; released on a failure, a cut held for the
            # request ends at the cap (hold_ns) at the latest.
            queue.announced -= 1


class ArrivalModel:
    """The recent arrival process of one model queue, and the hold it allows."""

    def __init__(self, factor: float = FACTOR) -> None:
        self.factor = factor
        self.gap_ns = math.inf  # no gap seen yet
        self.overlap = 0.0
        self._last_ns: int | None = None

    def arrived(self, now_ns: int, others: int) -> None:
        """A request arrived while ``others`` requests of the model were in flight."""
        last = self._last_ns
        if last is not None:
            gap = now_ns - last
            self.gap_ns = (
                gap if math.isinf(self.gap_ns) else self.gap_ns + ALPHA * (gap - self.gap_ns)
            )
        self._last_ns = now_ns
        self.overlap += ALPHA * ((1.0 if others else 0.0) - self.overlap)

    def hold_ns(self, single_run_ns: float, announced: int) -> float:
        """How long, from the oldest request's arrival, a cut with room left may wait."""
        if single_run_ns <= 0:
            return 0.0  # the model's cost is unknown: no basis for a bound
        cap = single_run_ns * self.factor
        if announced:
            return cap
        if self.overlap < OVERLAP or self.gap_ns > cap:
            return 0.0
        return min(self.gap_ns * SLACK, cap)
