"""Which model runs next on a device: ``fifo``, ``fair`` (weighted device time) or ``edf``.

Each device (``cpu``, ``cuda:0``, ...) has one DeviceScheduler with a number of slots: how many
batches may execute on it at once. A model queue with work asks for a slot; when slots are
scarce the discipline decides who gets the next one:

- ``fifo``: in the order the queues asked.
- ``fair``: weighted fair sharing of device *time*: each model's virtual time advances by
  measured execution time / weight, and the waiting model with the least virtual time goes
  next (so weights 3:1 under saturation get device time 3:1, whatever each batch costs).
- ``edf``: the queue whose oldest request has the earliest deadline goes next; requests that
  cannot finish before their deadline (by the learned cost of their batch) are shed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

Discipline = Literal["fifo", "fair", "edf"]
DISCIPLINES: tuple[Discipline, ...] = ("fifo", "fair", "edf")


class CostModel:
    """Learned execution time per batch size (exponential moving average, nanoseconds)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._by_size: dict[int, float] = {}

    def observe(self, batch_size: int, ns: int) -> None:
        old = self._by_size.get(batch_size)
        self._by_size[batch_size] = ns if old is None else old + self._alpha * (ns - old)

    def estimate(self, batch_size: int) -> float:
        """Expected ns for ``batch_size``; nearest known size scaled linearly, 0 if none."""
        if batch_size in self._by_size:
            return self._by_size[batch_size]
        if not self._by_size:
            return 0.0
        nearest = min(self._by_size, key=lambda s: abs(s - batch_size))
        return self._by_size[nearest] * batch_size / nearest


class SlotClient(Protocol):
    """A model queue as the device scheduler sees it."""

    weight: float
    cost: CostModel

    def granted(self) -> None:
        """A slot is ours: cut a batch and run it, or give the slot back."""
        ...

    def earliest_deadline(self) -> float:
        """Deadline (monotonic ns) of the most urgent waiting request; inf if none."""
        ...


@dataclass(slots=True)
class _Share:
    virtual_ns: float = 0.0
    busy_ns: int = 0  # device time used, for tests and metrics
    running: int = 0


@dataclass
class DeviceScheduler:
    """Grants execution slots on one device to model queues according to a discipline."""

    name: str
    discipline: Discipline = "fifo"
    slots: int = 0  # 0 = unlimited: every ready batch runs at once
    _in_use: int = 0
    _waiting: dict[SlotClient, int] = field(default_factory=dict)  # client -> arrival order
    _order: Callable[[], int] = field(default_factory=lambda: itertools.count().__next__)
    _shares: dict[SlotClient, _Share] = field(default_factory=dict)

    def acquire(self, client: SlotClient) -> bool:
        """True if ``client`` may run now; otherwise it is called back via ``granted()``."""
        share = self._share(client)
        if share.running == 0 and client not in self._waiting:
            # Returning from idle: start level with the least-served active model, so
            # time spent idle is not banked and then used to monopolise the device.
            active = [
                s.virtual_ns
                for c, s in self._shares.items()
                if c is not client and (s.running or c in self._waiting)
            ]
            share.virtual_ns = max(share.virtual_ns, min(active, default=share.virtual_ns))
        if (self.slots == 0 or self._in_use < self.slots) and not self._waiting:
            self._in_use += 1
            share.running += 1
            return True
        self._waiting.setdefault(client, self._order())
        return False

    def waiting(self, client: SlotClient) -> bool:
        """True while ``client`` was refused a slot and will be called back via ``granted()``."""
        return client in self._waiting

    def withdraw(self, client: SlotClient) -> None:
        self._waiting.pop(client, None)

    def release(self, client: SlotClient, busy_ns: int, requeue: bool = False) -> None:
        """Give a slot back, charging ``busy_ns`` of device time to ``client``.

        ``requeue``: the client has another batch ready and competes for the freed slot
        (otherwise a busy model could never win two turns in a row).
        """
        share = self._share(client)
        share.busy_ns += busy_ns
        share.virtual_ns += busy_ns / max(client.weight, 1e-9)
        share.running -= 1
        self._in_use -= 1
        if requeue:
            self._waiting.setdefault(client, self._order())
        while self._waiting and (self.slots == 0 or self._in_use < self.slots):
            nxt = self._pick()
            del self._waiting[nxt]
            self._in_use += 1
            self._share(nxt).running += 1
            nxt.granted()

    def busy_ns(self, client: SlotClient) -> int:
        share = self._shares.get(client)
        return share.busy_ns if share else 0

    def forget(self, client: SlotClient) -> None:
        self._waiting.pop(client, None)
        self._shares.pop(client, None)

    def _share(self, client: SlotClient) -> _Share:
        share = self._shares.get(client)
        if share is None:
            share = self._shares[client] = _Share()
        return share

    def _pick(self) -> SlotClient:
        if self.discipline == "fair":
            return min(self._waiting, key=lambda c: (self._share(c).virtual_ns, self._waiting[c]))
        if self.discipline == "edf":
            return min(self._waiting, key=lambda c: (c.earliest_deadline(), self._waiting[c]))
        return min(self._waiting, key=self._waiting.__getitem__)
