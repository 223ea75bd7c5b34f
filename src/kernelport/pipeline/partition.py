"""Where to cut a model into pipeline stages, and which devices to give them (pure functions).

A model is a sequence of blocks; a plan gives each chosen device one contiguous range of
blocks. Under load a pipeline moves at the pace of its slowest stage, so the plan minimises
the bottleneck: the largest per-micro-batch time of any stage, where a stage's time is
receiving its input, running its blocks and sending its output, one after the other (a
stage loop that overlaps them does no worse than this), plus the stage's fixed cost per
micro-batch on its device (measured: the channels and the loop are CPU work too, and on a
slow host they are slow). Each stage's weights must fit its device's memory budget.

This is the linear-partition dynamic programme over (blocks so far, devices used), so it
also chooses the devices' order and may leave a device out: a device that would only slow
the pipeline down never makes the bottleneck lower, and a plan on the fastest device alone
is always among the candidates. Ties go to the plan with the lower sum of stage times (fewer
hops, less latency). Exact for up to ``EXACT_DEVICES`` devices; beyond that the devices are
taken fastest first in a fixed order and only the cuts are optimised.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

EXACT_DEVICES = 8


@dataclass(frozen=True)
class Block:
    """One block of the model, as profiled.

    ``seconds``: time per micro-batch on each device kind. ``activation_bytes``: what the
    block hands the next one per micro-batch. ``weight_bytes``: memory it holds for life.
    """

    name: str
    seconds: Mapping[str, float]
    weight_bytes: int = 0
    activation_bytes: int = 0


@dataclass(frozen=True)
class Device:
    """A device a stage can run on. ``slowdown`` scales its kind's profiled times (a
    CPU-limited or shared host); ``link_bytes_per_s`` is its host's network link;
    ``stage_overhead_s`` is what a stage costs on it per micro-batch besides its blocks
    (taking its input off the channel, handing its output on, the stage loop), as
    ``kernelport profile --stage-overhead`` measures it, and is scaled by ``slowdown`` too."""

    name: str
    kind: str
    memory_bytes: int
    link_bytes_per_s: float = math.inf
    link_latency_s: float = 0.0
    slowdown: float = 1.0
    stage_overhead_s: float = 0.0


@dataclass(frozen=True)
class Stage:
    """``transfer_s``: the hand-offs, i.e. the stage's fixed cost on its device and its
    link hops; ``compute_s``: its blocks."""

    device: str
    start: int  # first block
    stop: int  # one past the last block
    compute_s: float
    transfer_s: float
    weight_bytes: int

    @property
    def seconds(self) -> float:
        return self.compute_s + self.transfer_s


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    left_out: tuple[str, ...] = field(default=())

    @property
    def bottleneck_s(self) -> float:
        return max((s.seconds for s in self.stages), default=math.inf)

    @property
    def latency_s(self) -> float:
        return sum(s.seconds for s in self.stages)

    def describe(self, blocks: Sequence[Block]) -> str:
        lines = [f"{'stage':<6}{'device':<16}{'blocks':<22}{'compute ms':>11}"
                 f"{'hand-off ms':>12}{'weights MiB':>12}"]  # fmt: skip
        for i, s in enumerate(self.stages):
            span = f"{blocks[s.start].name}..{blocks[s.stop - 1].name}"
            lines.append(
                f"{i:<6}{s.device:<16}{span:<22}{s.compute_s * 1e3:>11.3f}"
                f"{s.transfer_s * 1e3:>12.3f}{s.weight_bytes / 2**20:>12.1f}"
            )
        lines.append(
            f"bottleneck {self.bottleneck_s * 1e3:.3f} ms per micro-batch "
            f"(at most {1 / self.bottleneck_s:.1f} micro-batches/s); "
            f"latency {self.latency_s * 1e3:.3f} ms"
        )
        if self.left_out:
            lines.append("left out (would not make it faster): " + ", ".join(self.left_out))
        return "\n".join(lines)


class PartitionError(ValueError):
    """No plan fits: the message says which memory budget is too small."""


class _Costs:
    """Prefix sums, so a stage's cost is O(1) to price."""

    def __init__(self, blocks: Sequence[Block], devices: Sequence[Device]) -> None:
        self.blocks, self.devices = blocks, devices
        kinds = {d.kind for d in devices}
        for block in blocks:
            missing = kinds - set(block.seconds)
            if missing:
                raise PartitionError(
                    f"block {block.name!r} has no time for device kind(s) {sorted(missing)}"
                )
        self.time = {k: _prefix([b.seconds[k] for b in blocks]) for k in kinds}
        self.weights = _prefix([float(b.weight_bytes) for b in blocks])

    def stage(self, d: int, start: int, stop: int) -> Stage | None:
        """The stage of blocks [start, stop) on device ``d``, or None if it does not fit."""
        device = self.devices[d]
        weight = int(self.weights[stop] - self.weights[start])
        if weight > device.memory_bytes:
            return None
        compute = (self.time[device.kind][stop] - self.time[device.kind][start]) * device.slowdown
        transfer = device.stage_overhead_s * device.slowdown
        if start > 0:  # receive the previous block's activation
            transfer += _hop(self.blocks[start - 1].activation_bytes, device)
        if stop < len(self.blocks):
            transfer += _hop(self.blocks[stop - 1].activation_bytes, device)
        return Stage(device.name, start, stop, compute, transfer, weight)


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _hop(nbytes: int, device: Device) -> float:
    return device.link_latency_s + nbytes / device.link_bytes_per_s


def partition(blocks: Sequence[Block], devices: Sequence[Device]) -> Plan:
    """The plan with the lowest bottleneck (then the lowest latency) that fits in memory."""
    if not blocks:
        raise PartitionError("the model has no blocks")
    if not devices:
        raise PartitionError("no devices to place the model on")
    if len({d.name for d in devices}) != len(devices):
        raise PartitionError("device names must be unique")
    costs = _Costs(blocks, devices)
    if len(devices) <= EXACT_DEVICES:
        plan = _exact(costs)
    else:
        plan = _in_order(costs, sorted(range(len(devices)), key=lambda d: _speed(costs, d)))
    if plan is None:
        total = int(costs.weights[-1])
        budgets = ", ".join(f"{d.name} {d.memory_bytes}" for d in devices)
        raise PartitionError(
            f"the model's {len(blocks)} blocks ({total} weight bytes) fit on no choice of "
            f"these devices (memory budgets in bytes: {budgets})"
        )
    used = {s.device for s in plan.stages}
    left_out = tuple(d.name for d in devices if d.name not in used)
    return Plan(plan.stages, left_out)


def _speed(costs: _Costs, d: int) -> float:
    device = costs.devices[d]
    return costs.time[device.kind][-1] * device.slowdown


# Each cell: (bottleneck, latency, stages) of the best plan so far, or None.
_Cell = tuple[float, float, tuple[Stage, ...]] | None


def _better(a: _Cell, b: _Cell) -> bool:
    return b is None or (a is not None and (a[0], a[1], len(a[2])) < (b[0], b[1], len(b[2])))


def _extend(cell: _Cell, stage: Stage | None) -> _Cell:
    if cell is None or stage is None:
        return None
    return (max(cell[0], stage.seconds), cell[1] + stage.seconds, (*cell[2], stage))


def _exact(costs: _Costs) -> Plan | None:
    """Dynamic programme over (blocks placed, set of devices used): every order, every subset."""
    n, m = len(costs.blocks), len(costs.devices)
    best: list[dict[int, _Cell]] = [dict() for _ in range(n + 1)]
    best[0][0] = (0.0, 0.0, ())
    for stop in range(1, n + 1):
        for start in range(stop):
            for d in range(m):
                stage = costs.stage(d, start, stop)
                if stage is None:
                    continue
                for used, cell in best[start].items():
                    if used >> d & 1:
                        continue
                    candidate = _extend(cell, stage)
                    key = used | 1 << d
                    if _better(candidate, best[stop].get(key)):
                        best[stop][key] = candidate
    return _pick(best[n].values())


def _in_order(costs: _Costs, order: Sequence[int]) -> Plan | None:
    """The same programme with the devices' order fixed; a device may still be skipped."""
    n = len(costs.blocks)
    # best[k][stop]: blocks [0, stop) placed on devices among order[:k], the last on order[k-1]
    best: list[list[_Cell]] = [[None] * (n + 1) for _ in range(len(order) + 1)]
    best[0][0] = (0.0, 0.0, ())
    for k, d in enumerate(order, start=1):
        for stop in range(1, n + 1):
            for start in range(stop):
                stage = costs.stage(d, start, stop)
                for prev in range(k):
                    candidate = _extend(best[prev][start], stage)
                    if _better(candidate, best[k][stop]):
                        best[k][stop] = candidate
    return _pick(row[n] for row in best)


def _pick(cells: Iterable[_Cell]) -> Plan | None:
    chosen: _Cell = None
    for cell in cells:
        if _better(cell, chosen):
            chosen = cell
    return None if chosen is None else Plan(chosen[2])


def evaluate(
    blocks: Sequence[Block], devices: Sequence[Device], cuts: Sequence[int]
) -> Plan | None:
    """The plan that puts blocks [cuts[i], cuts[i+1]) on devices[i] (a split chosen some
    other way, priced by the same model), or None if a stage does not fit in memory."""
    costs = _Costs(blocks, devices)
    bounds = [0, *cuts, len(blocks)]
    stages = []
    for d, (start, stop) in enumerate(itertools.pairwise(bounds)):
        if start == stop:
            continue
        stage = costs.stage(d, start, stop)
        if stage is None:
            return None
        stages.append(stage)
    return Plan(tuple(stages))


def best_single_device(blocks: Sequence[Block], devices: Sequence[Device]) -> Plan | None:
    """The fastest plan that keeps the whole model on one device, or None if none holds it."""
    costs = _Costs(blocks, devices)
    plans = [costs.stage(d, 0, len(blocks)) for d in range(len(devices))]
    return _pick((s.seconds, s.seconds, (s,)) for s in plans if s is not None)


def even_cuts(n_blocks: int, n_devices: int) -> list[int]:
    """Equal block counts per device: what a split that ignores speed and memory does."""
    return [round(n_blocks * i / n_devices) for i in range(1, n_devices)]


def memory_cuts(blocks: Sequence[Block], devices: Sequence[Device]) -> list[int]:
    """Blocks in proportion to each device's memory, the rule exo and llama.cpp use."""
    total = sum(d.memory_bytes for d in devices)
    cuts, share = [], 0
    for device in devices[:-1]:
        share += device.memory_bytes
        cuts.append(round(len(blocks) * share / total))
    return cuts
