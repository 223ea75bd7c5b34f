"""One worker process for one model version: start, feed, watch, restart, stop.

The process is ``python -m kernelport.worker`` (a fresh interpreter, never a fork of the
threaded server). It inherits two descriptors: its end of a socketpair (control messages,
:mod:`kernelport.core.wire`) and the arena's memfd (:mod:`kernelport.core.arena`). Replies
are read on the event loop (``add_reader``), so a batch's future resolves with no thread
hop. The socket's EOF is the death signal: every batch the process held fails with
UNAVAILABLE, and a new process is started after a backoff (0.1 s doubling to 5 s, back to
0.1 s after a minute of health). A batch that outlives the model's execution timeout gets
DEADLINE_EXCEEDED and its process is SIGKILLed, then restarted the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelport.core import shm
from kernelport.core.arena import Allocator, Arena, ArenaLayout
from kernelport.core.backend import Arrays
from kernelport.core.execution import BatchResult
from kernelport.core.model_config import ModelConfig
from kernelport.core.placement import place_inputs, read_outputs
from kernelport.core.wire import (
    Frame,
    FrameReader,
    Kind,
    TensorRef,
    frame_bytes,
    json_body,
    pack_refs,
)
from kernelport.core.worker_regions import WorkerRegions
from kernelport.errors import ErrorCode, ServerError, unavailable

log = logging.getLogger("kernelport.workers")

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
HEALTHY_AFTER_S = 60.0  # up this long: the next crash starts the backoff over
STOP_GRACE_S = 5.0  # a stopping worker gets this long to unload before SIGKILL
#: batches one instance may hold: the running one and one waiting behind it in the worker
#: (``ProcessPool.depth``), so a busy process starts its next batch without waiting a round
#: trip to the server for it
DEPTH = 2


@dataclass(slots=True)
class _InFlight:
    future: asyncio.Future[BatchResult]
    counts: list[int]
    input_offset: int | None
    input_ns: int
    instance: int
    sent_ns: int
    timer: asyncio.TimerHandle | None = None
    waited_ns: int = 0  # behind the instance's running batch, in the worker


class ProcessHost:
    """Owns the worker process of one model version and the batches it holds."""

    def __init__(
        self,
        config: ModelConfig,
        path: Path,
        devices: list[str],
        timeout_s: float | None,
        arena_bytes: int,
    ) -> None:
        self.config = config
        self.up = False
        self.restarts = 0
        self.pid = 0  # the worker process serving now (0 until it is up)
        self.on_up: Callable[[], None] = lambda: None
        self._path = path
        self._devices = devices
        self._timeout_s = timeout_s
        self._layout = ArenaLayout.split(arena_bytes, len(devices), DEPTH)
        self._loop = asyncio.get_running_loop()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._arena: Arena | None = None
        self._inputs = Allocator(self._layout.input_bytes)
        self._reader = FrameReader()
        self._outbox = bytearray()
        self._in_flight: dict[int, _InFlight] = {}
        #: each instance's batches in the order it runs them: the execution timeout runs
        #: for the first only (one waiting behind it has not started)
        self._lines: list[collections.deque[int]] = [collections.deque() for _ in devices]
        self._next_batch = 0
        self._ready: asyncio.Future[list[list[str]]] | None = None
        self._stopping = False
        self._killed_for = ""  # why we killed the process (a stuck batch), for the others
        self._backoff = BACKOFF_FIRST_S
        self._up_since = 0.0
        self._restart: asyncio.TimerHandle | None = None
        self._ever_up = False
        self._watch: asyncio.Task[None] | None = None  # referenced: a task may be GC'd
        self._regions = WorkerRegions(self._loop, self._send, self._queue)
        shm.subscribe(self._regions)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> list[list[str]]:
        """Start the process and wait until it loaded every instance: their hook names."""
        self._spawn()
        assert self._ready is not None
        try:
            hooks = await self._ready
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return hooks

    def _spawn(self) -> None:
        """Start a process (on the loop's thread: PR_SET_PDEATHSIG in the child is tied to
        the thread that forked it, and this one lives as long as the server)."""
        self._arena = Arena.create(self._layout.total)
        self._inputs = Allocator(self._layout.input_bytes)
        ours = self._connect(self._arena)
        ours.setblocking(False)
        self._sock = ours
        self._reader = FrameReader()
        self._outbox.clear()
        self._regions.reset()
        self._ready = self._loop.create_future()
        init = {
            "config": self.config.model_dump(mode="json"),
            "path": str(self._path),
            "devices": self._devices,
            "layout": [self._layout.input_bytes, self._layout.output_slot_bytes, DEPTH],
        }
        self._send(frame_bytes(Kind.INIT, 0, 0, json_body(init)))
        self._loop.add_reader(ours.fileno(), self._on_readable)

    def _connect(self, arena: Arena) -> socket.socket:
        """A new worker process and our end of its control socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [sys.executable, "-m", "kernelport.worker", str(theirs.fileno()),
                   str(arena.fd), str(os.getpid())]  # fmt: skip
        try:
            # A session of its own: a Ctrl-C meant for the server must not kill its workers
            # mid-batch; the server stops them (and PR_SET_PDEATHSIG covers its death).
            self._proc = subprocess.Popen(
                command, pass_fds=(theirs.fileno(), arena.fd), start_new_session=True
            )
        finally:
            theirs.close()
        return ours

    def stop(self) -> None:
        """Stop the process: EOF asks it to unload and exit; SIGKILL after a grace period.

        Called on a thread (it waits for the process), after the queue has drained."""
        self._stopping = True
        self.up = False
        shm.unsubscribe(self._regions)
        proc, sock = self._proc, self._sock
        if self._restart is not None:
            self._loop.call_soon_threadsafe(self._restart.cancel)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        if proc is not None:
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("model '%s' worker did not stop in %ss: killed",
                            self.config.name, STOP_GRACE_S)  # fmt: skip
                proc.kill()
                proc.wait()
        try:
            self._loop.call_soon_threadsafe(self._detach)
        except RuntimeError:  # the loop is closed: nothing is watching the socket any more
            self._close_channel()

    def _detach(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        self._close_channel()
        self._fail_all(unavailable(f"model '{self.config.name}' is unloading"))

    def _close_channel(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._arena is not None:
            self._arena.close()
            self._arena = None

    # --- batches ---------------------------------------------------------------------------

    def submit(
        self, instance: int, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        if not self.up or self._arena is None:
            future.set_exception(unavailable(f"model '{config.name}' worker is restarting"))
            return future
        t0 = time.perf_counter_ns()
        refs, tail, offset = self._place(parts, config)
        batch = self._next_batch = (self._next_batch + 1) & 0xFFFFFFFF
        sent = time.perf_counter_ns()
        job = _InFlight(future, counts, offset, sent - t0, instance, sent)
        self._in_flight[batch] = job
        line = self._lines[instance]
        line.append(batch)
        if len(line) == 1:
            self._started(batch, job)
        self._send(frame_bytes(Kind.BATCH, batch, instance, pack_refs(refs), *tail))
        return future

    def _place(
        self, parts: list[Arrays], config: ModelConfig
    ) -> tuple[list[TensorRef], list[bytes], int | None]:
        """Write the batch's concatenation straight into an arena slot (inline when the
        arena is full or the batch is bigger than it, for BYTES tensors, and for batches
        of at most :data:`INLINE_MAX` bytes)."""
        if len(parts) > 1 and not config.batching:
            raise AssertionError("only batching models run several requests at once")
        # One request's inputs that lie in a client's system region: the worker reads them
        # from its own mapping of it (concatenating several requests needs the copy anyway).
        in_region = (
            self._regions.find(parts[0], self._sock, bool(self._outbox))
            if len(parts) == 1 and shm.registered()
            else {}
        )
        assert self._arena is not None
        return place_inputs(parts, in_region, self._arena.view, self._inputs)

    def _started(self, batch: int, job: _InFlight) -> None:
        """``batch`` is its instance's running batch now: its execution timeout starts."""
        if self._timeout_s is not None:
            job.timer = self._loop.call_later(self._timeout_s, self._stuck, batch)

    def _done(self, batch: int) -> _InFlight | None:
        """Take ``batch``'s job (None if it timed out already) and start the next batch's
        timeout on its instance."""
        job = self._in_flight.pop(batch, None)
        if job is None:
            return None
        line = self._lines[job.instance]
        running = bool(line) and line[0] == batch
        with contextlib.suppress(ValueError):
            line.remove(batch)
        if running and line and (following := self._in_flight.get(line[0])) is not None:
            # It starts about now (the worker began it as this one's reply went out).
            following.waited_ns = time.perf_counter_ns() - following.sent_ns
            self._started(line[0], following)
        self._release(job)
        return job

    def _stuck(self, batch: int) -> None:
        job = self._in_flight.pop(batch, None)
        if job is None or not self.pid:
            return
        timeout = self._timeout_s
        log.error(
            "model '%s': a batch ran longer than the execution timeout (%ss): killing its "
            "worker (pid %d)",
            self.config.name,
            timeout,
            self.pid,
        )
        self._release(job)
        if not job.future.done():
            job.future.set_exception(
                ServerError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"model '{self.config.name}' did not finish a batch within its execution "
                    f"timeout of {timeout:g}s; its worker was killed and is restarting",
                )
            )
        self._killed_for = f"killed: a batch outlived the execution timeout of {timeout:g}s"
        self.up = False
        self._kill()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def _release(self, job: _InFlight) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if job.input_offset is not None:
            self._inputs.free(job.input_offset)

    # --- the socket --------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Send now when the socket takes it; queue the rest and send when it drains."""
        if self._sock is None:
            return
        if self._outbox:
            self._outbox += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the process is gone: its EOF is on the way to _on_readable
        if sent < len(data):
            self._queue(data[sent:])

    def _queue(self, rest: bytes) -> None:
        """Send ``rest`` (the end of a frame the socket took in part) once it drains."""
        assert self._sock is not None
        self._outbox += rest
        self._loop.add_writer(self._sock.fileno(), self._flush)

    def _flush(self) -> None:
        assert self._sock is not None
        try:
            sent = self._sock.send(self._outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self._outbox)
        del self._outbox[:sent]
        if not self._outbox:
            self._loop.remove_writer(self._sock.fileno())

    def _on_readable(self) -> None:
        sock = self._sock
        assert sock is not None
        reader = self._reader
        while True:
            try:
                frames = reader.read(sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                frames = None
            if frames is None:
                self._on_eof()
                return
            for message in frames:
                self._handle(message)
            if not reader.full or self._sock is not sock:
                return

    def _handle(self, message: Frame) -> None:
        if message.kind is Kind.RESULT:
            job = self._done(message.batch)
            if job is None:  # timed out already: its process is being killed
                return
            if not job.future.done():
                self._resolve(job, message.body)
        elif message.kind is Kind.ERROR:
            job = self._done(message.batch)
            if job is not None:
                error = _json(message.body)
                if not job.future.done():
                    code = ErrorCode(error["code"])
                    job.future.set_exception(ServerError(code, error["message"]))
        elif message.kind is Kind.READY:
            ready = _json(message.body)
            self.pid = int(ready.get("pid", 0))
            self._on_ready(ready["hooks"])
        elif message.kind is Kind.LOAD_FAILED:
            error = _json(message.body)
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(ServerError(ErrorCode(error["code"]), error["message"]))

    def _resolve(self, job: _InFlight, body: memoryview) -> None:
        t0 = time.perf_counter_ns()
        assert self._arena is not None
        config = self.config
        try:
            split, infer_ns = read_outputs(
                body, self._arena.view, job.counts, config.batching, config.name
            )
        except ServerError as exc:
            job.future.set_exception(exc)
            return
        output_ns = time.perf_counter_ns() - t0
        job.future.set_result(BatchResult(split, job.input_ns, infer_ns, output_ns, job.waited_ns))

    def _on_ready(self, hooks: list[list[str]]) -> None:
        self.up = True
        self._ever_up = True
        self._up_since = time.monotonic()
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(hooks)
        if self.restarts:
            log.info("model '%s' worker restarted (pid %d)", self.config.name, self.pid)
        self.on_up()

    # --- death and restart ---------------------------------------------------------------------

    def _on_eof(self) -> None:
        assert self._sock is not None
        self._loop.remove_reader(self._sock.fileno())
        if self._outbox:
            self._loop.remove_writer(self._sock.fileno())
        if self._stopping:
            return
        self.up = False
        self._lost()

    def _lost(self) -> None:
        """The worker process is gone: reap it, fail its batches, start another."""
        proc = self._proc
        assert proc is not None
        self._watch = self._loop.create_task(self._after_death(proc))

    async def _after_death(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            code = await asyncio.to_thread(proc.wait, STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # it closed the socket but lives on: finish it
            proc.kill()
            code = await asyncio.to_thread(proc.wait)
        if self._stopping:
            return
        how = self._killed_for or _exit_reason(code)
        self._killed_for = ""
        name = self.config.name
        self._close_channel()
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(unavailable(f"model '{name}' worker exited ({how})"))
        if not self._ever_up:  # the first load failed: the model fails to load, no restart
            return
        log.error("model '%s' worker (pid %d) died (%s); restarting", name, proc.pid, how)
        self._fail_all(unavailable(f"model '{name}' worker died ({how}); restarting"))
        if time.monotonic() - self._up_since >= HEALTHY_AFTER_S:
            self._backoff = BACKOFF_FIRST_S
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        self.restarts += 1
        self._restart = self._loop.call_later(delay, self._respawn)

    def _respawn(self) -> None:
        self._restart = None
        if self._stopping:
            return
        try:
            self._spawn()
        except OSError as exc:
            log.error("model '%s' worker could not start: %s", self.config.name, exc)
            self._restart = self._loop.call_later(self._backoff, self._respawn)
            return
        ready = self._ready
        assert ready is not None
        ready.add_done_callback(self._respawned)

    def _respawned(self, ready: asyncio.Future[list[list[str]]]) -> None:
        if ready.cancelled() or ready.exception() is None:
            return
        # A load that failed in the new process: it exits; its EOF schedules the next try.
        log.error("model '%s' worker failed to load again: %s", self.config.name,
                  ready.exception())  # fmt: skip

    def _fail_all(self, error: ServerError) -> None:
        jobs = list(self._in_flight.values())
        self._in_flight.clear()
        for line in self._lines:
            line.clear()
        for job in jobs:
            if job.timer is not None:
                job.timer.cancel()
            if not job.future.done():
                job.future.set_exception(error)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _json(body: memoryview) -> dict[str, Any]:
    value = json.loads(bytes(body))
    assert isinstance(value, dict)
    return value
