"""The partitioner against exhaustive search, and the heterogeneous cases exo and llama.cpp
get wrong (a slower device added makes the whole model slower)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelport.pipeline import partition as part
from kernelport.pipeline.partition import (
    Block,
    Device,
    PartitionError,
    best_single_device,
    evaluate,
    even_cuts,
    memory_cuts,
    partition,
)


def blocks_of(n: int, ms: float = 1.0, weight: int = 100, activation: int = 1000) -> list[Block]:
    return [
        Block(f"b{i}", {"fast": ms * 1e-3, "slow": 2 * ms * 1e-3}, weight, activation)
        for i in range(n)
    ]


def brute_force(blocks: list[Block], devices: list[Device]) -> float:
    """The lowest bottleneck over every ordered subset of devices and every set of cuts."""
    best = math.inf
    n = len(blocks)
    for k in range(1, len(devices) + 1):
        for chosen in itertools.permutations(devices, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                plan = evaluate(blocks, list(chosen), list(cuts))
                if plan is not None and len(plan.stages) == k:
                    best = min(best, plan.bottleneck_s)
    return best


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[Block], list[Device]]:
    n = draw(st.integers(1, 6))
    blocks = [
        Block(
            f"b{i}",
            {"a": draw(st.integers(1, 9)) * 1e-3, "b": draw(st.integers(1, 9)) * 1e-3},
            draw(st.integers(0, 50)),
            draw(st.integers(0, 4000)),
        )
        for i in range(n)
    ]
    devices = [
        Device(
            f"d{i}",
            draw(st.sampled_from(["a", "b"])),
            draw(st.integers(0, 200)),
            link_bytes_per_s=draw(st.sampled_from([1e5, 1e6, math.inf])),
            link_latency_s=draw(st.sampled_from([0.0, 1e-4])),
            slowdown=draw(st.sampled_from([1.0, 1.5, 3.0])),
            stage_overhead_s=draw(st.sampled_from([0.0, 2e-3])),
        )
        for i in range(draw(st.integers(1, 3)))
    ]
    return blocks, devices


@settings(max_examples=150, deadline=None)
@given(instances())
def test_the_plan_is_as_good_as_exhaustive_search(case: tuple[list[Block], list[Device]]) -> None:
    blocks, devices = case
    optimum = brute_force(blocks, devices)
    if math.isinf(optimum):
        with pytest.raises(PartitionError, match="fit on no choice"):
            partition(blocks, devices)
        return
    plan = partition(blocks, devices)
    assert plan.bottleneck_s == pytest.approx(optimum)
    # A real partition: contiguous, in order, every block placed once, each within budget.
    assert plan.stages[0].start == 0 and plan.stages[-1].stop == len(blocks)
    assert all(a.stop == b.start for a, b in itertools.pairwise(plan.stages))
    budget = {d.name: d.memory_bytes for d in devices}
    assert all(s.weight_bytes <= budget[s.device] for s in plan.stages)
    assert len({s.device for s in plan.stages}) == len(plan.stages)
    assert set(plan.left_out) == {d.name for d in devices} - {s.device for s in plan.stages}


def test_a_device_that_only_slows_the_pipeline_is_left_out() -> None:
    # exo #489: a fast host alone beat the fast and the slow host together. Over a slow link
    # the hand-off costs more than the slow host saves, so it stays out.
    blocks = blocks_of(8)
    fast = Device("fast", "fast", 10_000, link_bytes_per_s=1e5, link_latency_s=1e-3)
    slow = Device("slow", "slow", 10_000, link_bytes_per_s=1e5, link_latency_s=1e-3)
    plan = partition(blocks, [slow, fast])
    assert [s.device for s in plan.stages] == ["fast"] and plan.left_out == ("slow",)
    alone = evaluate(blocks, [fast], [])
    assert alone is not None and plan.bottleneck_s == alone.bottleneck_s
    both_even = evaluate(blocks, [fast, slow], even_cuts(8, 2))
    assert both_even is not None and both_even.bottleneck_s > plan.bottleneck_s


def test_a_slower_device_takes_a_smaller_share_on_a_fast_link() -> None:
    blocks = blocks_of(9)
    fast = Device("fast", "fast", 10_000, link_bytes_per_s=1e10)
    slow = Device("slow", "slow", 10_000, link_bytes_per_s=1e10)
    plan = partition(blocks, [slow, fast])
    share = {s.device: s.stop - s.start for s in plan.stages}
    assert share == {"fast": 6, "slow": 3}  # 6 ms each: twice the speed, twice the blocks
    alone = evaluate(blocks, [fast], [])
    assert alone is not None and plan.bottleneck_s < alone.bottleneck_s


def test_when_memory_forces_a_split_the_plan_beats_even_and_memory_proportional_splits() -> None:
    blocks = blocks_of(12, weight=100)  # 1200 bytes of weights: neither device holds them all
    fast = Device("fast", "fast", 900, link_bytes_per_s=1e10)
    slow = Device("slow", "slow", 1100, link_bytes_per_s=1e10)
    with pytest.raises(PartitionError, match="fit on no choice"):
        partition(blocks, [fast])
    plan = partition(blocks, [fast, slow])
    assert len(plan.stages) == 2
    even = evaluate(blocks, [fast, slow], even_cuts(12, 2))
    by_memory = evaluate(blocks, [fast, slow], memory_cuts(blocks, [fast, slow]))
    assert even is not None and by_memory is not None
    assert plan.bottleneck_s < even.bottleneck_s and plan.bottleneck_s < by_memory.bottleneck_s


def test_many_devices_fall_back_to_a_fixed_order_that_still_skips_and_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks = blocks_of(10)
    devices = [
        Device(f"d{i}", "fast", 400, link_bytes_per_s=1e10, slowdown=1 + i) for i in range(4)
    ]
    exact = partition(blocks, devices)
    monkeypatch.setattr(part, "EXACT_DEVICES", 2)
    ordered = partition(blocks, devices)
    assert ordered.bottleneck_s >= exact.bottleneck_s
    assert ordered.stages[0].start == 0 and ordered.stages[-1].stop == 10
    assert all(s.weight_bytes <= 400 for s in ordered.stages)


def test_bad_inputs_name_what_is_wrong() -> None:
    with pytest.raises(PartitionError, match="no blocks"):
        partition([], [Device("d", "fast", 1)])
    with pytest.raises(PartitionError, match="no devices"):
        partition(blocks_of(2), [])
    with pytest.raises(PartitionError, match="unique"):
        partition(blocks_of(2), [Device("d", "fast", 1), Device("d", "slow", 1)])
    with pytest.raises(
        PartitionError, match=r"block 'b0' has no time for device kind\(s\) \['gpu'\]"
    ):
        partition(blocks_of(2), [Device("d", "gpu", 1000)])
    with pytest.raises(PartitionError, match="d 150"):
        partition(blocks_of(2, weight=100), [Device("d", "fast", 150)])


def test_describe_shows_stages_the_bottleneck_and_what_was_left_out() -> None:
    blocks = blocks_of(4)
    plan = partition(
        blocks,
        [Device("fast", "fast", 10_000, 1e5, 1e-3), Device("slow", "slow", 10_000, 1e5, 1e-3)],
    )
    text = plan.describe(blocks)
    assert "b0..b3" in text and "bottleneck 4.000 ms" in text
    assert "left out (would not make it faster): slow" in text


def test_a_measured_stage_overhead_keeps_the_fast_device_alone() -> None:
    # The exo #489 case with what a stage costs besides its blocks: 4 blocks of 1 ms on the
    # fast device, the other device a CPU-limited one (2x). Free hand-offs make a split look
    # faster; a measured overhead of 2.5 ms a stage (slowed 2x on the slow host) does not.
    blocks = blocks_of(4, activation=0)
    free = [Device("fast", "fast", 10**6), Device("slow", "fast", 10**6, slowdown=2.0)]
    assert len(partition(blocks, free).stages) == 2
    costly = [
        Device("fast", "fast", 10**6, stage_overhead_s=2.5e-3),
        Device("slow", "fast", 10**6, slowdown=2.0, stage_overhead_s=2.5e-3),
    ]
    plan = partition(blocks, costly)
    assert [s.device for s in plan.stages] == ["fast"]
    assert plan.left_out == ("slow",)
    assert plan.bottleneck_s == pytest.approx(4e-3 + 2.5e-3)
    split = evaluate(blocks, costly, [3])
    assert split is not None
    assert split.stages[1].transfer_s == pytest.approx(5e-3)  # the overhead, slowed down
    assert split.bottleneck_s > plan.bottleneck_s


def test_the_best_single_device_is_the_fastest_that_holds_the_model() -> None:
    blocks = blocks_of(4, weight=100)
    devices = [
        Device("small-fast", "fast", 300),  # cannot hold the 400 bytes
        Device("slow", "slow", 1000),
        Device("shared", "fast", 1000, slowdown=1.5),
    ]
    alone = best_single_device(blocks, devices)
    assert alone is not None
    assert [(s.device, s.start, s.stop) for s in alone.stages] == [("shared", 0, 4)]
    assert best_single_device(blocks, devices[:1]) is None
