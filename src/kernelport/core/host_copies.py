"""What an ``on_demand`` model keeps in host memory so that, once evicted from its device,
it loads again without reading its files (ReactantServer's host-resident weights).

The backend decides what the copy is (a torch module whose weights sit in pinned host
memory, an ONNX model's bytes) and puts it here while it loads an instance; the next load
of the same version gets it back. The memory budget (``core/memory.py``) charges the copies
to the host budget and drops them, least recently used first, when the host needs the room;
a dropped copy means the next load reads the disk again.

A copy remembers its file's size and modification time: when the file has been replaced
since (it differs), the copy is stale and the next load reads the new file, as it did before
copies were kept; a file that is gone or unreadable leaves the copy in use (stat only, the
file is not opened).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from pathlib import Path
from typing import Protocol


class HostKept(Protocol):
    """One thing a backend kept in host memory."""

    @property
    def nbytes(self) -> int: ...

    def drop(self) -> None:
        """Release the host memory (a resident instance using it keeps what it needs)."""
        ...


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class HostCopies:
    """A model version's host-kept copies, by a key its backend chooses (instance, file).

    Loads put and get from worker threads while the budget drops from the event loop: a
    lock keeps the map consistent."""

    #: never a loaded model: the budget's eviction pass drops the copies instead
    resident = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.device = "cpu"  # charged to the host budget, whatever device the model uses
        self._items: dict[Hashable, HostKept] = {}
        self._stamps: dict[Hashable, tuple[int, int] | None] = {}
        self._lock = threading.Lock()
        self.drops = 0

    @property
    def size(self) -> int:
        with self._lock:
            return sum(item.nbytes for item in self._items.values())

    def get(self, key: Hashable, source: Path) -> HostKept | None:
        """The copy kept under ``key``, unless ``source`` (the file it was read from) has
        been replaced since."""
        now = _stamp(source)
        with self._lock:
            if now is not None and now != self._stamps.get(key):
                return None
            return self._items.get(key)

    def put(self, key: Hashable, item: HostKept, source: Path) -> None:
        stamp = _stamp(source)
        with self._lock:
            old, self._items[key] = self._items.get(key), item
            self._stamps[key] = stamp
        if old is not None and old is not item:
            old.drop()

    def holds(self, item: HostKept) -> bool:
        with self._lock:
            return any(kept is item for kept in self._items.values())

    def drop(self) -> None:
        """Forget every copy: the next load reads the model's files."""
        with self._lock:
            items, self._items = list(self._items.values()), {}
            self._stamps.clear()
        for item in items:
            item.drop()
        if items:
            self.drops += 1
