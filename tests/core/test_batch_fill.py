"""Batch fill (core/fill.py) on the fake clock: when a cut with no delay may wait, and how long.

Same fakes as test_batcher.py: no real time passes, nothing sleeps.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_batcher import US, Harness, code, harness, turn

from kernelport.core.fill import FACTOR, OVERLAP, SLACK, Announcement, ArrivalModel
from kernelport.errors import ErrorCode

RUN = 200 * US  # what the fake model's single-row run is reported to cost
GAP = 50 * US  # clients' inter-arrival gap: shorter than a run
CAP = int(RUN * FACTOR)
HOLD = int(GAP * SLACK)


async def busy_stream(h: Harness, clients: int = 6) -> list[asyncio.Task[Any]]:
    """Several clients: the first request runs alone (the cost is learned from it) while the
    others arrive GAP apart and find it in flight; then the rest run and the model is idle."""
    tasks = [await h.submit(1, 0)]
    for tag in range(1, clients):
        h.clock.advance(GAP)
        tasks.append(await h.submit(1, tag))
    while not h.batches[-1].future.done():
        await h.complete(infer_ns=RUN)
        h.clock.advance(CAP)  # what a full batch left behind may be held, up to the cap
        await turn()
    assert all(t.done() for t in tasks)
    assert h.queue.queued == 0 and h.queue.running == 0
    return tasks


async def test_one_client_never_waits() -> None:
    h = harness(max_batch_size=8, batching={})
    for tag in range(40):
        task = await h.submit(1, tag)
        assert len(h.batches) == tag + 1  # cut the moment it arrived, whatever the gap
        await h.complete(infer_ns=RUN)
        await task
        h.clock.advance(GAP // 5)  # the client answers fast: gaps far shorter than a run
    assert all(b.counts == [1] for b in h.batches)


async def test_a_steady_stream_with_gaps_shorter_than_a_run_forms_batches() -> None:
    h = harness(max_batch_size=8, batching={})
    await busy_stream(h)
    n = len(h.batches)
    for round_ in range(3):
        h.clock.advance(GAP)
        first = await h.submit(1, 10 * round_)
        assert len(h.batches) == n + round_  # held: the next request is expected
        h.clock.advance(GAP)
        second = await h.submit(1, 10 * round_ + 1)
        h.clock.advance(CAP - GAP)
        assert h.batches[-1].tags == [10 * round_, 10 * round_ + 1]  # they ran together
        await h.complete(infer_ns=RUN)
        assert GAP < (await first)[1].queue_ns <= CAP and (await second)[1].batch_size == 2


async def test_the_wait_ends_when_the_batch_is_full_or_a_preferred_size_is_reachable() -> None:
    h = harness(max_batch_size=2, batching={})
    await busy_stream(h)
    n = len(h.batches)
    await h.submit(1, 1)
    assert len(h.batches) == n  # held
    await h.submit(1, 2)  # no time passed: full, so cut at once
    assert h.batches[-1].tags == [1, 2]

    p = harness(max_batch_size=8, batching={"preferred_batch_sizes": [2]})
    await busy_stream(p)
    await p.submit(1, 1)
    await p.submit(1, 2)
    assert p.batches[-1].tags == [1, 2]


async def test_a_stream_that_stops_strands_nothing_the_wait_is_bounded() -> None:
    h = harness(max_batch_size=8, batching={})
    tasks = [await h.submit(1, 0)]
    for tag in range(1, 8):  # the model stays busy while they arrive: no gap between cuts
        h.clock.advance(GAP)
        tasks.append(await h.submit(1, tag))
    await h.complete(infer_ns=RUN)
    h.clock.advance(GAP)
    last = await h.submit(1, 99)  # and then nobody else comes
    assert h.batches[-1].tags == [1, 2, 3, 4, 5, 6, 7] and h.queue.queued == 1  # held
    await h.complete(infer_ns=RUN)  # the model is idle: only the hold keeps it waiting
    h.clock.advance(HOLD - 1)
    assert h.queue.queued == 1
    h.clock.advance(1)  # 1.5 learned gaps after it arrived: it runs alone
    assert h.batches[-1].tags == [99]
    await h.complete(infer_ns=RUN)
    assert (await last)[1].queue_ns == HOLD <= CAP


async def test_a_gap_longer_than_the_cap_means_no_wait() -> None:
    h = harness(max_batch_size=8, batching={})
    tasks = [await h.submit(1, 0)]
    for tag in range(1, 6):
        h.clock.advance(CAP + GAP)  # requests overlap, but each comes too late to wait for
        tasks.append(await h.submit(1, tag))
    await h.complete(infer_ns=RUN)
    await h.complete(infer_ns=RUN)
    h.clock.advance(CAP + GAP)
    await h.submit(1, 9)
    assert h.batches[-1].tags == [9]


async def test_an_announced_request_is_waited_for_at_most_the_cap() -> None:
    h = harness(max_batch_size=8, batching={})
    first = await h.submit(1, 0)  # unknown cost: nothing to bound a wait by, so it runs
    assert len(h.batches) == 1
    await h.complete(infer_ns=RUN)
    await first
    h.queue.announced = 1  # the data plane is preprocessing one for this model
    held = await h.submit(1, 1)
    h.clock.advance(CAP - 1)
    assert len(h.batches) == 1
    h.clock.advance(1)  # the announced one never came: the held one runs at the cap
    assert h.batches[-1].tags == [1]
    await h.complete(infer_ns=RUN)
    assert (await held)[1].queue_ns == CAP


async def test_at_concurrency_one_a_request_is_no_longer_announced_when_its_batch_is_cut() -> None:
    # As a front end does it: announced while received and decoded, released just before
    # it is submitted. The lone request's own announcement never holds its own cut.
    h = harness(max_batch_size=8, batching={})
    for tag in range(20):
        announcement = Announcement(h.queue)
        h.clock.advance(GAP)  # receiving and decoding it
        assert h.queue.announced == 1
        announcement.release()
        task = await h.submit(1, tag)
        assert len(h.batches) == tag + 1  # cut the moment it arrived: nothing else is coming
        assert h.queue.announced == 0
        announcement.release()  # the front end's finally: no effect
        await h.complete(infer_ns=RUN)
        assert (await task)[1].queue_ns == 0
    assert h.queue.announced == 0 and all(b.counts == [1] for b in h.batches)


async def test_a_held_cut_is_joined_by_the_announced_request() -> None:
    h = harness(max_batch_size=8, batching={})
    first = await h.submit(1, 0)  # the cost is learned from it
    await h.complete(infer_ns=RUN)
    await first
    coming = Announcement(h.queue)  # another client's request: its body is being read
    h.clock.advance(GAP)
    held = await h.submit(1, 1)
    assert len(h.batches) == 1  # held for the announced one, up to the cap
    h.clock.advance(GAP)
    coming.release()
    joined = await h.submit(1, 2)  # it arrived: the cut re-runs and takes both at once
    assert h.batches[-1].tags == [1, 2]
    await h.complete(infer_ns=RUN)
    assert (await held)[1].queue_ns == GAP < CAP
    assert (await joined)[1].batch_size == 2


async def test_the_wait_leaves_a_timed_request_time_to_run() -> None:
    h = harness(max_batch_size=8, batching={})
    await busy_stream(h)
    h.queue.announced = 1  # would hold for CAP
    timeout_ns = 2 * RUN + 3 * GAP
    task = await h.submit(1, 7, timeout=timeout_ns // US)
    cut_at = timeout_ns - round(h.queue.cost.estimate(2))
    assert 0 < cut_at < CAP
    n = len(h.batches)
    h.clock.advance(cut_at - 1)
    assert len(h.batches) == n
    h.clock.advance(1)
    assert h.batches[-1].tags == [7]
    await h.complete(infer_ns=RUN)
    assert (await task)[1].queue_ns == cut_at  # ran, not DEADLINE_EXCEEDED


async def test_a_timeout_shorter_than_the_run_still_fails_in_the_queue_as_before() -> None:
    h = harness(max_batch_size=1, batching={})
    await h.submit(1, 0)  # running
    late = await h.submit(1, 1, timeout=50)
    h.clock.advance(50 * US)
    await turn()
    assert code(late) is ErrorCode.DEADLINE_EXCEEDED


async def test_fill_batches_off_cuts_at_once() -> None:
    h = harness(max_batch_size=8, batching={"fill_batches": False})
    await busy_stream(h)
    h.queue.announced = 1
    await h.submit(1, 1)
    assert h.batches[-1].tags == [1]


async def test_a_delay_keeps_its_own_rule() -> None:
    h = harness(max_batch_size=8, batching={"max_queue_delay_us": 30})
    h.queue.announced = 1  # ignored: the delay decides
    await h.submit(1, 1)
    h.clock.advance(30 * US)
    assert [b.tags for b in h.batches] == [[1]]


# --- the arrival model alone -------------------------------------------------------------


def test_arrivals_that_never_overlap_never_allow_a_wait() -> None:
    model = ArrivalModel()
    for i in range(1000):
        model.arrived(i * 1000, 0)  # one client: nobody else is ever in flight
    assert model.overlap == 0.0 and model.hold_ns(RUN, 0) == 0.0


@pytest.mark.parametrize(
    ("single_run_ns", "announced", "expected"),
    [(0.0, 1, 0.0), (RUN, 1, CAP), (RUN, 0, HOLD), (15 * US, 0, 15 * US * FACTOR)],
)
def test_the_hold(single_run_ns: float, announced: int, expected: float) -> None:
    model = ArrivalModel()
    for i in range(20):
        model.arrived(i * GAP, 3)
    assert model.overlap >= OVERLAP
    assert model.hold_ns(single_run_ns, announced) == pytest.approx(expected)
