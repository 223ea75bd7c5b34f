"""Time as the batcher sees it: a seam, so tests can drive delays and timeouts by hand.

Production uses :class:`LoopClock`, the running event loop's monotonic clock; a test passes
a fake whose time moves only when the test advances it, so no real time passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Cancellable(Protocol):
    """A scheduled callback that can be called off (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time in nanoseconds and callbacks after a delay."""

    def now_ns(self) -> int: ...

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> Cancellable: ...


class LoopClock:
    """The running event loop's clock (``loop.time()`` is ``time.monotonic()``)."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> Cancellable:
        return asyncio.get_running_loop().call_later(delay_s, fn)
