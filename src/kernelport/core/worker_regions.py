"""The client regions a worker process has mapped, so that a request's inputs in a client's
system shared-memory region reach its model without a copy (``docs/processes.md``, "How a
batch crosses").

The first time a region's bytes go to a process, the server opens the region's object again
(read-only) and sends its descriptor with a REGION frame (``SCM_RIGHTS``); the worker maps
it and reads the inputs as views of its own mapping. Unregistering the region sends FORGET.
A new process (a restart) starts with none. A listener of :mod:`kernelport.core.shm`, which
holds its listeners weakly (so this stays an interpreted class: compiled ones take no weak
references).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

from kernelport.core import shm
from kernelport.core.backend import Arrays
from kernelport.core.wire import FORGET_BODY, REGION_BODY, Kind, frame_bytes


class WorkerRegions:
    """The regions one worker process has mapped (an ``shm`` listener)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[bytes], None],
        queue: Callable[[bytes], None],
    ) -> None:
        self._loop = loop
        self._send = send  # a whole frame, in order with the batches
        self._queue = queue  # the rest of a frame the socket took in part
        self.mapped: set[int] = set()  # region ids the current process has
        self._refused: set[int] = set()  # could not be sent to it: their inputs are copied

    def reset(self) -> None:
        """A new process: it has mapped nothing."""
        self.mapped.clear()
        self._refused.clear()

    def find(
        self, arrays: Arrays, sock: socket.socket | None, backlog: bool
    ) -> dict[str, tuple[int, int]]:
        """The inputs the process can read from a client region: name -> (region id, offset).

        ``backlog``: the socket has bytes queued, so a descriptor cannot go out now."""
        found = {}
        for name, array in arrays.items():
            where = shm.locate(array)
            if where is not None and array.nbytes and self._share(where[0], sock, backlog):
                found[name] = (where[0].id, where[1])
        return found

    def _share(self, record: shm.RegionRecord, sock: socket.socket | None, backlog: bool) -> bool:
        if record.id in self.mapped:
            return True
        if record.id in self._refused or sock is None or backlog:
            return False  # the descriptor must go with its frame's first byte
        try:
            # The object as it is now under its key: only the one registered may be handed
            # on, or the worker would read another object than the server maps.
            fd = os.open(record.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            self._refused.add(record.id)
            return False
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != record.ident:
                self._refused.add(record.id)
                return False
            data = frame_bytes(Kind.REGION, 0, 0, REGION_BODY.pack(record.id, record.length))
            try:
                sent = socket.send_fds(sock, [data], [fd])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:  # the process is gone: its EOF is on the way
                return False
        finally:
            os.close(fd)
        if sent < len(data):
            self._queue(data[sent:])
        self.mapped.add(record.id)
        return True

    def region_gone(self, region_id: int) -> None:
        """A client region was unregistered (maybe on another thread than the loop's)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to tell
            self._loop.call_soon_threadsafe(self._forget, region_id)

    def _forget(self, region_id: int) -> None:
        self._refused.discard(region_id)
        if region_id in self.mapped:
            self.mapped.discard(region_id)
            self._send(frame_bytes(Kind.FORGET, 0, 0, FORGET_BODY.pack(region_id)))
