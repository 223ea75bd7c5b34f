"""Poll mode: keep the loaded models in step with the model repository directories.

``watchfiles`` (inotify / FSEvents / ReadDirectoryChangesW) says *when* something changed, so
changes are picked up at once; a full rescan every ``interval`` seconds is the fallback for
file systems it cannot watch (NFS and the like) or a watcher that failed to start. Either way
the decision is made from fingerprints of each model directory (file paths, sizes and
modification times), never from the events themselves:

* a new directory is loaded, a changed one reloaded (atomically: see ``core.manager``), a
  removed one unloaded;
* a change is applied only once the model's directory has stayed the same for ``debounce``
  seconds, so a model still being copied is never loaded half-written;
* a failed load is retried only when the directory changes again; a failed reload leaves
  the old versions serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from watchfiles import awatch

from kernelport.core.manager import ModelManager
from kernelport.core.repository import Fingerprint, ModelSource, fingerprint
from kernelport.errors import ServerError

log = logging.getLogger("kernelport.poller")

_GONE = None  # fingerprint of a model directory that no longer exists


class RepositoryPoller:
    """Watches the manager's repositories and reconciles the loaded models with them."""

    def __init__(
        self,
        manager: ModelManager,
        interval: float,
        debounce: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._manager = manager
        self._interval = interval
        self._debounce = debounce
        self._clock = clock
        self._applied: dict[str, Fingerprint | None] = {}  # what each model was loaded from
        self._pending: dict[str, tuple[Fingerprint | None, float]] = {}  # changed: (fp, since)
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load every model in the repositories (failures are recorded, never fatal), then
        watch them."""
        sources = await self._manager.rescan()
        prints = await asyncio.to_thread(_fingerprints, sources)
        for name in sorted(sources):
            self._applied[name] = prints[name]  # taken before loading: no change is missed
            with contextlib.suppress(ServerError):  # recorded and logged by the manager
                await self._manager.load(name)
        self._tasks = [
            asyncio.create_task(self._watch(), name="kernelport-repository-watch"),
            asyncio.create_task(self._run(), name="kernelport-repository-poll"),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _watch(self) -> None:
        roots = [str(p) for p in self._manager.repositories]
        watch_log = logging.getLogger("watchfiles")
        if watch_log.level == logging.NOTSET:
            # It logs "N changes detected" at INFO for every write; our own lines say what
            # was loaded, reloaded or unloaded, and why.
            watch_log.setLevel(logging.WARNING)
        try:
            async for _ in awatch(*roots, stop_event=self._stopping, debounce=200, step=20):
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "cannot watch the model repository (%s); rescanning it every %gs instead",
                exc,
                self._interval,
            )

    async def _run(self) -> None:
        timeout = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
            self._changed.clear()
            try:
                due = await self.reconcile()
            except Exception:
                log.exception("repository poll failed")
                due = None
            timeout = self._interval
            if due is not None:
                timeout = min(timeout, max(0.0, due - self._clock()))

    async def reconcile(self) -> float | None:
        """Apply every change that has been quiet for ``debounce`` seconds.

        Returns when (on ``clock``) the next pending change becomes due, if any.
        """
        try:
            sources = await self._manager.rescan()
        except ServerError as exc:
            log.error("repository scan failed: %s", exc.message)
            return None
        # Walking every model directory blocks: on a thread, so requests keep being served.
        current = await asyncio.to_thread(_fingerprints, sources)
        now = self._clock()
        next_due: float | None = None
        for name in sorted(set(current) | set(self._applied)):
            seen = current.get(name, _GONE)
            if name in self._applied and self._applied[name] == seen:
                self._pending.pop(name, None)  # back to what is loaded: nothing to do
                continue
            pending = self._pending.get(name)
            if pending is None or pending[0] != seen:
                self._pending[name] = (seen, now)  # changed (again): the quiet period restarts
                due = now + self._debounce
            elif now - pending[1] >= self._debounce:
                del self._pending[name]
                await self._apply(name, seen)
                continue
            else:
                due = pending[1] + self._debounce
            next_due = due if next_due is None else min(next_due, due)
        return next_due

    async def _apply(self, name: str, seen: Fingerprint | None) -> None:
        if seen is _GONE:
            self._applied.pop(name, None)
            if self._manager.known(name):
                log.info("model '%s' was removed from the repository: unloading it", name)
                with contextlib.suppress(ServerError):
                    await self._manager.unload(name, forget=True)
            return
        was_loaded = name in self._applied
        self._applied[name] = seen
        log.info("model '%s' %s the repository: loading it", name,
                 "changed in" if was_loaded else "was added to")  # fmt: skip
        with contextlib.suppress(ServerError):  # recorded and logged by the manager
            await self._manager.load(name)


def _fingerprints(sources: dict[str, ModelSource]) -> dict[str, Fingerprint]:
    return {name: fingerprint(source.path) for name, source in sources.items()}
