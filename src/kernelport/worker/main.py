"""The worker process's loop: load the instances, then run the batches the server sends.

One thread per instance, as in the server; the main thread reads the control socket. EOF
on it means the server is stopping (or gone): the instances are unloaded and the process
exits. On Linux the process also asks the kernel for SIGKILL when its parent dies, so a
stuck instance cannot keep it alive after a server crash.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import mmap
import os
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernelport.backends.registry import get_backend
from kernelport.core.arena import ArenaLayout
from kernelport.core.backend import LoadContext, ModelInstance
from kernelport.core.execution import HOOKS
from kernelport.core.model_config import ModelConfig
from kernelport.core.reshape import ReshapedInstance, framework_config, has_reshape
from kernelport.core.wire import (
    FORGET_BODY,
    INLINE_MAX,
    REGION_BODY,
    Frame,
    FrameReader,
    Kind,
    frame_bytes,
    json_body,
    pack_refs,
    pack_timing,
    place_arrays,
    read_arrays,
    unpack_refs,
)
from kernelport.errors import ErrorCode, ServerError

log = logging.getLogger("kernelport.worker")

_PR_SET_PDEATHSIG = 1
_UNLOAD_WAIT_S = 3.0  # the server SIGKILLs after 5 s; instance threads get this long


def main(argv: list[str]) -> int:
    sock_fd, arena_fd, parent = (int(a) for a in argv[:3])
    configure_logging()
    die_with(parent)
    yield_to_front_ends()
    channel = Channel(socket.socket(fileno=sock_fd))
    init_frame = channel.next()
    if init_frame is None or init_frame.kind is not Kind.INIT:
        return 2
    init = json.loads(bytes(init_frame.body))
    config = ModelConfig.model_validate(init["config"])
    devices: list[str] = init["devices"]
    input_bytes, slot_bytes, depth = init["layout"]
    layout = ArenaLayout(input_bytes, slot_bytes, len(devices), depth)
    arena = mmap.mmap(arena_fd, layout.total)
    view = memoryview(arena)
    try:
        instances = load_instances(config, Path(init["path"]), devices)
    except BaseException as exc:  # the server reports it as the model's load failure
        code = exc.code if isinstance(exc, ServerError) else ErrorCode.INVALID_ARGUMENT
        message = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
        channel.send(frame_bytes(Kind.LOAD_FAILED, 0, 0, json_body({"code": code.value,
                                                              "message": message})))  # fmt: skip
        return 1
    hooks = [[h for h in HOOKS if callable(getattr(i, h, None))] for i in instances]
    channel.send(frame_bytes(Kind.READY, 0, 0, json_body({"hooks": hooks, "pid": os.getpid()})))
    link = Link(channel, view, layout)
    runners = [Runner(config, instance, index) for index, instance in enumerate(instances)]
    # One instance: its batches run on this thread, in the order they come (a second one
    # waits in the socket), saving a thread hop per batch; several: each has a thread.
    alone = runners[0] if len(runners) == 1 else None
    for runner in runners if alone is None else ():
        runner.start()
    while (batch := channel.next()) is not None:
        if batch.kind is not Kind.BATCH:
            link.control(batch)
        elif batch.instance >= len(runners):
            continue
        elif alone is not None:
            alone.handle(link, batch, link.regions)
        else:
            runners[batch.instance].jobs.put((link, batch, link.regions))
    link.close()
    return stop_runners(runners, config.name)


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [worker %(process)d] %(message)s",
    )


def stop_runners(runners: list[Runner], model: str) -> int:
    """Let the instance threads finish, unload the instances, and give the exit code."""
    for runner in runners:
        runner.jobs.put(None)
    deadline = time.monotonic() + _UNLOAD_WAIT_S
    for runner in runners:
        if runner.thread.is_alive():
            runner.thread.join(max(0.0, deadline - time.monotonic()))
        if not runner.thread.is_alive():
            _unload(runner.instance, model)
    sys.stdout.flush()
    if any(runner.thread.is_alive() for runner in runners):
        os._exit(0)  # a stuck instance thread must not keep the process alive
    return 0  # a normal exit: atexit handlers run (coverage's, when tests measure us)


def die_with(parent: int) -> None:
    """SIGKILL when the server dies (Linux); the socket's EOF covers other platforms."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def yield_to_front_ends() -> None:
    """Run under ``SCHED_BATCH`` (Linux): a batch arriving does not preempt the front end.

    Where a worker shares a core with its front end, a worker that preempts the front end
    the moment a batch arrives (what the scheduler does for a task that sleeps often) runs
    it while requests wait undecoded, so the next batch is cut from the few decoded since:
    on one core at c=32 the `mlp`'s batches averaged ~9 rows against ~14 in process, and
    throughput was 10-15% lower. Under ``SCHED_BATCH`` the batch waits until the front end
    yields the core, and the next cut takes what it decoded meanwhile (bench/RESULTS.md,
    issue 12). The worker still gets its fair share of the core, and a free core runs it at
    once, so nothing changes where it has a core of its own."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, policy, os.sched_param(0))


def load_instances(config: ModelConfig, path: Path, devices: list[str]) -> list[ModelInstance]:
    backend = get_backend(config.backend)
    reshaped = has_reshape(config)
    seen = framework_config(config) if reshaped else config
    instances: list[ModelInstance] = []
    try:
        for index, device in enumerate(devices):
            instance: ModelInstance = backend.load(LoadContext(seen, path, device, index))
            instances.append(ReshapedInstance(instance, config) if reshaped else instance)
    except BaseException:
        for instance in instances:
            _unload(instance, config.name)
        raise
    return instances


def _unload(instance: ModelInstance, model: str) -> None:
    try:
        instance.unload()
    except Exception:
        log.exception("model '%s': unload failed", model)


class Channel:
    """The control socket: frames in on the main thread, out from any instance thread."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._reader = FrameReader(fds=True)
        self._frames: collections.deque[Frame] = collections.deque()
        self._lock = threading.Lock()

    def next(self) -> Frame | None:
        while not self._frames:
            frames = self._reader.read(self._sock)
            if frames is None:
                return None
            self._frames.extend(frames)
        return self._frames.popleft()

    def take_fd(self) -> int | None:
        """The next descriptor received (each REGION frame brings one, in order)."""
        fds = self._reader.fds
        return fds.popleft() if fds else None

    def close_fds(self) -> None:
        while (fd := self.take_fd()) is not None:
            os.close(fd)

    def send(self, data: bytes) -> None:
        # OSError: the server is gone; the main thread sees EOF and exits
        with self._lock, contextlib.suppress(OSError):
            self._sock.sendall(data)


class Link:
    """One server process's connection and its arena (several with ``--frontends``).

    A plain class, not a dataclass: mypyc cannot build a dataclass with a memoryview field."""

    def __init__(self, channel: Channel, view: memoryview, layout: ArenaLayout) -> None:
        self.channel = channel
        self.view = view
        self.layout = layout  # its input area and output slots (two per instance, in turn)
        self.closed = False  # its server went away: its queued batches are dropped
        #: batches run so far per instance: which of its slots the next one writes
        self.turns: dict[int, int] = {}
        #: client regions mapped (REGION) by id. Replaced, never changed in place: a queued
        #: batch holds the one current when it arrived, so a FORGET after it cannot unmap
        #: what it will read (a mapping is unmapped when its last holder lets go of it).
        self.regions: dict[int, mmap.mmap] = {}

    def control(self, message: Frame) -> None:
        """REGION and FORGET (on the thread that reads the socket)."""
        if message.kind is Kind.REGION:
            fd = self.channel.take_fd()
            if fd is None:  # cannot happen with our server; its batches fail cleanly
                return
            region, length = REGION_BODY.unpack_from(message.body)
            try:
                mapping = mmap.mmap(fd, length, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:  # e.g. truncated since: batches fail
                log.warning("cannot map a shared memory region: %s", exc)
                return
            finally:
                os.close(fd)  # the mapping holds the object
            self.regions = {**self.regions, region: mapping}
        elif message.kind is Kind.FORGET:
            (region,) = FORGET_BODY.unpack_from(message.body)
            # No close(): a batch still queued may hold it; dropping ours unmaps it now when
            # nothing else does, else with the last batch that reads it.
            self.regions = {k: v for k, v in self.regions.items() if k != region}

    def close(self) -> None:
        self.channel.close_fds()
        self.regions = {}

    def output_base(self, instance: int) -> int:
        """The slot for ``instance``'s next batch (only its own runner thread calls this)."""
        turn = self.turns.get(instance, 0)
        self.turns[instance] = turn + 1
        return self.layout.output_offset(instance, turn)


Regions = dict[int, mmap.mmap]
Job = tuple[Link, Frame, Regions]  # a batch, its front end's link and mapped regions


@dataclass
class Runner:
    config: ModelConfig
    instance: ModelInstance
    index: int
    jobs: queue.SimpleQueue[Job | None] = field(init=False)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.jobs = queue.SimpleQueue()
        name = f"{self.config.name}_{self.index}"
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not job[0].closed:
                self.handle(*job)

    def handle(self, link: Link, job: Frame, regions: Regions) -> None:
        """Run one batch and send its reply; the model's errors become the reply."""
        try:
            reply = self._run(link, job, regions)
        except ServerError as exc:
            reply = self._error(job, exc.code, exc.message)
        except Exception as exc:
            message = f"model '{self.config.name}' failed: {type(exc).__name__}: {exc}"
            reply = self._error(job, ErrorCode.INTERNAL, message)
        except BaseException as exc:  # e.g. SystemExit in user code: the worker lives on
            message = f"model '{self.config.name}' failed: {type(exc).__name__}"
            reply = self._error(job, ErrorCode.INTERNAL, message)
        link.channel.send(reply)

    def _run(self, link: Link, job: Frame, regions: Regions) -> bytes:
        refs, pos = unpack_refs(job.body)
        inputs = read_arrays(refs, link.view, job.body[pos:], copy=False, regions=regions)
        t0 = time.perf_counter_ns()
        outputs = self.instance.execute(inputs)
        infer_ns = time.perf_counter_ns() - t0
        out = {name: _array(value) for name, value in outputs.items()}
        out_base = link.output_base(self.index)
        placed, tail = place_arrays(
            out, link.view, out_base, link.layout.output_slot_bytes, INLINE_MAX
        )
        return frame_bytes(Kind.RESULT, job.batch, self.index, pack_timing(infer_ns),
                           pack_refs(placed), *tail)  # fmt: skip

    def _error(self, job: Frame, code: ErrorCode, message: str) -> bytes:
        body = json_body({"code": code.value, "message": message})
        return frame_bytes(Kind.ERROR, job.batch, self.index, body)


def _array(value: Any) -> Any:
    return np.asarray(value)
