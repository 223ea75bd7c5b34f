"""The model workers every front end of ``--frontends N`` shares, owned by the supervisor.

The supervisor owns them, not a front end, because it is the one process whose death ends
the server anyway: a front end that dies (and is restarted) must not take the workers the
others use with it. It knows nothing about models: a front end loading a worker-mode model
asks, over a Unix socket in the supervisor's private directory, for the worker of a key
(the model version and a digest of its exact settings); the first ask starts
``python -m kernelport.worker --shared`` with a listening socket the supervisor keeps, later
asks (the other front ends, a restarted one) get the same address. The worker loads the
model when the first front end's INIT arrives.

A worker that dies is started again once, with backoff (0.1 s doubling to 5 s, reset
after a minute of health), on the same listening socket: the front ends' new connections
wait in its backlog until the new process accepts them. Stopping closes each worker's stop
socket (it unloads and exits), then SIGKILLs one that has not exited after 5 s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kernelport.frontends")

BACKOFF_S = (0.1, 5.0)  # first and longest wait before a restart
HEALTHY_S = 60.0
STOP_GRACE_S = 5.0
BACKLOG = 128  # front ends connecting while their worker restarts wait here


@dataclass(slots=True)
class SharedWorker:
    key: str
    model: str
    address: Path
    listener: socket.socket
    process: subprocess.Popen[bytes] | None = None
    stop: socket.socket | None = None
    started: float = 0.0
    backoff: float = BACKOFF_S[0]
    restart_at: float | None = None
    restarts: int = 0
    pids: list[int] = field(default_factory=list)  # every process it had, oldest first


class WorkerBroker:
    """Starts shared workers on request and restarts them; ``check()`` is the watch."""

    def __init__(self, directory: Path) -> None:
        self.address = directory / "workers.sock"
        self._dir = directory
        self._lock = threading.Lock()
        self._workers: dict[str, SharedWorker] = {}
        self._stopping = False
        self._control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control.bind(str(self.address))
        self._control.listen(BACKLOG)
        # Workers die with the thread that started them (PR_SET_PDEATHSIG): this one lives
        # as long as the supervisor, and so does the thread that calls check().
        self._thread = threading.Thread(target=self._serve, name="worker-broker", daemon=True)
        self._thread.start()

    @property
    def workers(self) -> list[SharedWorker]:
        with self._lock:
            return list(self._workers.values())

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._control.accept()
            except OSError:  # closed: the supervisor is stopping
                return
            with conn:
                try:
                    conn.settimeout(STOP_GRACE_S)
                    with conn.makefile("rb") as lines:
                        ask = json.loads(lines.readline(1 << 16))
                    address = self.ensure(str(ask["key"]), str(ask.get("model", "?")))
                    conn.sendall(json.dumps({"address": address}).encode() + b"\n")
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("a front end's request for a shared worker failed: %s", exc)

    def ensure(self, key: str, model: str) -> str:
        """The address of the worker for ``key``, started now if there is none."""
        with self._lock:
            if self._stopping:
                raise OSError("the server is stopping")
            worker = self._workers.get(key)
            if worker is None:
                address = self._dir / f"w{len(self._workers)}.sock"
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(address))
                listener.listen(BACKLOG)
                worker = SharedWorker(key, model, address, listener)
                self._workers[key] = worker
                self._spawn(worker)
            return str(worker.address)

    def _spawn(self, worker: SharedWorker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen = worker.listener.fileno()
        command = [sys.executable, "-m", "kernelport.worker", "--shared", str(listen),
                   str(theirs.fileno()), str(os.getpid())]  # fmt: skip
        try:
            # its own session: a Ctrl-C at the supervisor must not kill it mid-batch
            worker.process = subprocess.Popen(
                command, pass_fds=(listen, theirs.fileno()), start_new_session=True
            )
        finally:
            theirs.close()
        worker.stop = ours
        worker.started = time.monotonic()
        worker.restart_at = None
        worker.pids.append(worker.process.pid)
        log.info("model '%s': shared worker started (pid %d)", worker.model, worker.process.pid)

    def check(self) -> None:
        """Restart workers that died (once each, whichever front ends used them)."""
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return
            for worker in self._workers.values():
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        self._spawn(worker)
                    continue
                assert worker.process is not None
                code = worker.process.poll()
                if code is None:
                    continue
                if worker.stop is not None:
                    worker.stop.close()
                    worker.stop = None
                if now - worker.started > HEALTHY_S:
                    worker.backoff = BACKOFF_S[0]
                log.error("model '%s': shared worker (pid %d) died (%s); restarting in %.1fs",
                          worker.model, worker.process.pid, _reason(code),
                          worker.backoff)  # fmt: skip
                worker.restarts += 1
                worker.restart_at = now + worker.backoff
                worker.backoff = min(worker.backoff * 2, BACKOFF_S[1])

    def stop(self) -> None:
        """Stop every worker (after the front ends stopped): EOF, then SIGKILL after 5 s."""
        with self._lock:
            self._stopping = True
            workers = list(self._workers.values())
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_RDWR)  # wakes the accept() of _serve
        self._control.close()
        for worker in workers:
            if worker.stop is not None:
                worker.stop.close()
            worker.listener.close()
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in workers:
            proc = worker.process
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("model '%s' shared worker did not stop in %ss: killed",
                            worker.model, STOP_GRACE_S)  # fmt: skip
                proc.kill()
                proc.wait()


def _reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
