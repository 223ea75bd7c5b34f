"""``python -m kernelport.worker --shared LISTEN_FD STOP_FD PARENT_PID``: one model worker
for every front end of ``--frontends N``.

The front-end supervisor (:mod:`kernelport.hosting.shared_workers`) owns the listening Unix
socket and keeps it across restarts of this process, so a front end can connect while the
worker is down and is served once the next one accepts. Each connection is one front end:
its first byte carries the descriptor of that front end's own arena (``SCM_RIGHTS``), then
the usual frames follow (:mod:`kernelport.core.wire`). The first INIT loads the instances;
later ones attach to them. Batches from every front end queue on the instance's thread, so
one instance runs one batch at a time whoever sent it, and each batch's inputs and outputs
stay in the arena of the front end that sent it: a front end that dies takes only its own
arena (unmapped once no batch of it is running) and its queued batches with it.

EOF on the stop socket (the supervisor closing it, or dying) unloads and exits.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import select
import socket
import threading
from pathlib import Path

from kernelport.core.arena import ArenaLayout
from kernelport.core.execution import HOOKS
from kernelport.core.model_config import ModelConfig
from kernelport.core.wire import Kind, frame_bytes, json_body
from kernelport.errors import ErrorCode, ServerError
from kernelport.worker.main import (
    Channel,
    Link,
    Runner,
    configure_logging,
    die_with,
    load_instances,
    stop_runners,
    yield_to_front_ends,
)

log = logging.getLogger("kernelport.worker")


def serve_shared(argv: list[str]) -> int:
    listen_fd, stop_fd, parent = (int(a) for a in argv[:3])
    configure_logging()
    die_with(parent)
    yield_to_front_ends()
    listener = socket.socket(fileno=listen_fd)
    stop = socket.socket(fileno=stop_fd)
    worker = _Shared()
    while True:
        ready, _, _ = select.select([listener, stop], [], [])
        if stop in ready:
            break
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        threading.Thread(target=worker.attach, args=(conn,), daemon=True).start()
    listener.close()
    return worker.close()


class _Shared:
    """The instances, loaded once, and the front ends attached to them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._config: ModelConfig | None = None
        self._runners: list[Runner] = []
        self._hooks: list[list[str]] = []

    def attach(self, conn: socket.socket) -> None:
        """Serve one front end until it goes away (its connection's EOF)."""
        try:
            _, fds, _, _ = socket.recv_fds(conn, 1, 1)
        except OSError:
            fds = []
        if not fds:
            conn.close()
            return
        channel = Channel(conn)
        try:
            link = self._hello(channel, fds[0])
        finally:
            os.close(fds[0])  # the mapping keeps its own reference
        if link is None:
            conn.close()
            return
        runners = self._runners
        while (batch := channel.next()) is not None:
            if batch.kind is not Kind.BATCH:
                link.control(batch)  # its regions: ids are per front end
            elif batch.instance < len(runners):
                runners[batch.instance].jobs.put((link, batch, link.regions))
        # Its queued batches are skipped; the arena and its regions are unmapped when the
        # last one running drops its views (reference counting).
        link.closed = True
        link.close()
        conn.close()

    def _hello(self, channel: Channel, arena_fd: int) -> Link | None:
        init_frame = channel.next()
        if init_frame is None or init_frame.kind is not Kind.INIT:
            return None
        init = json.loads(bytes(init_frame.body))
        devices: list[str] = init["devices"]
        input_bytes, slot_bytes, depth = init["layout"]
        layout = ArenaLayout(input_bytes, slot_bytes, len(devices), depth)
        try:
            self._load(ModelConfig.model_validate(init["config"]), Path(init["path"]), devices)
        except BaseException as exc:  # the front end reports it as the model's load failure
            code = exc.code if isinstance(exc, ServerError) else ErrorCode.INVALID_ARGUMENT
            message = (
                exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            )
            body = json_body({"code": code.value, "message": message})
            channel.send(frame_bytes(Kind.LOAD_FAILED, 0, 0, body))
            return None
        arena = mmap.mmap(arena_fd, layout.total)
        link = Link(channel, memoryview(arena), layout)
        body = json_body({"hooks": self._hooks, "pid": os.getpid()})
        channel.send(frame_bytes(Kind.READY, 0, 0, body))
        return link

    def _load(self, config: ModelConfig, path: Path, devices: list[str]) -> None:
        with self._lock:  # the first front end loads; the others wait for it, then attach
            if self._config is not None:
                return
            instances = load_instances(config, path, devices)
            self._hooks = [[h for h in HOOKS if callable(getattr(i, h, None))] for i in instances]
            self._runners = [Runner(config, inst, i) for i, inst in enumerate(instances)]
            for runner in self._runners:
                runner.start()
            self._config = config
            log.info("model '%s': %d instance(s) loaded for every front end", config.name,
                     len(instances))  # fmt: skip

    def close(self) -> int:
        with self._lock:
            if self._config is None:
                return 0
            return stop_runners(self._runners, self._config.name)
