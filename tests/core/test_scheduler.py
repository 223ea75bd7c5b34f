from __future__ import annotations

import math

from kernelport.core.scheduler import CostModel, DeviceScheduler


class Client:
    def __init__(self, name: str, weight: float = 1.0, deadline: float = math.inf) -> None:
        self.name = name
        self.weight = weight
        self.cost = CostModel()
        self.deadline = deadline
        self.grants = 0

    def granted(self) -> None:
        self.grants += 1

    def earliest_deadline(self) -> float:
        return self.deadline


def test_cost_model_learns_and_interpolates() -> None:
    cost = CostModel(alpha=0.5)
    assert cost.estimate(4) == 0.0
    cost.observe(4, 400)
    cost.observe(4, 800)
    assert cost.estimate(4) == 600
    assert cost.estimate(8) == 1200  # scaled from the nearest known size


def test_unlimited_slots_grant_at_once() -> None:
    device = DeviceScheduler("cpu")
    a, b = Client("a"), Client("b")
    assert device.acquire(a) and device.acquire(b) and device.acquire(a)


def test_fifo_grants_in_arrival_order() -> None:
    device = DeviceScheduler("cpu", "fifo", slots=1)
    a, b, c = Client("a"), Client("b"), Client("c")
    assert device.acquire(a)
    assert not device.acquire(c) and not device.acquire(b)
    device.release(a, 10)
    assert (c.grants, b.grants) == (1, 0)


def test_fair_follows_weighted_device_time() -> None:
    device = DeviceScheduler("gpu", "fair", slots=1)
    heavy, light = Client("heavy", weight=3), Client("light", weight=1)
    holder = heavy
    assert device.acquire(heavy)
    for _ in range(400):
        # Both always have work: the releasing model competes for the freed slot.
        other = light if holder is heavy else heavy
        device.acquire(other)
        before = (heavy.grants, light.grants)
        device.release(holder, 1000, requeue=True)
        holder = heavy if heavy.grants > before[0] else light
        device.withdraw(light if holder is heavy else heavy)
    ratio = device.busy_ns(heavy) / device.busy_ns(light)
    assert 2.9 <= ratio <= 3.1


def test_returning_model_does_not_bank_idle_time() -> None:
    device = DeviceScheduler("gpu", "fair", slots=1)
    busy, idle = Client("busy"), Client("idle")
    assert device.acquire(busy)
    for _ in range(50):
        device.release(busy, 1000)
        assert device.acquire(busy)
    # `idle` shows up late: it must share from now on, not take 50 turns to "catch up".
    assert not device.acquire(idle)
    holder, turns = busy, []
    for _ in range(10):
        before = idle.grants
        device.release(holder, 1000, requeue=True)
        holder = idle if idle.grants > before else busy
        turns.append(holder.name)
    assert turns.count("busy") >= 4, turns


def test_edf_picks_earliest_deadline() -> None:
    device = DeviceScheduler("gpu", "edf", slots=1)
    holder, late, soon = Client("h"), Client("late", deadline=900), Client("soon", deadline=100)
    assert device.acquire(holder)
    device.acquire(late)
    device.acquire(soon)
    device.release(holder, 5)
    assert (soon.grants, late.grants) == (1, 0)
