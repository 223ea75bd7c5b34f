"""``--frontends N``: N server processes on the same HTTP and gRPC ports, so protocol work
uses N cores (one Python event loop each).

This process (the supervisor) reserves the two ports (bound with SO_REUSEPORT, never
listening, so the kernel hands connections only to the front ends), writes the merged
settings to a private file, and starts N ``kernelport serve`` processes with
``--reuse-port`` on those ports; each loads its own models (in-process models are replicas)
and has its own metrics port. Worker-mode models are the exception: their worker processes
are started once, by this process, and every front end sends its batches to them
(:mod:`kernelport.hosting.shared_workers`). Client shared-memory regions are registered on
every front end through this process (:mod:`kernelport.hosting.regions`), which also carries
repository loads/unloads to every front end and gathers their statistics, so the node answers
as one server. The ports file lists
them all once every front end listens.
SIGINT/SIGTERM are passed on (each front end drains; a second signal cuts the drain short);
a front end that dies is started again with backoff.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from kernelport.config import Config, write_ports
from kernelport.hosting.regions import RegionHub
from kernelport.hosting.shared_workers import WorkerBroker
from kernelport.protocols.listen import bind

log = logging.getLogger("kernelport.frontends")

START_TIMEOUT_S = 300.0
_SOCKET_DIR_MAX = 80  # AF_UNIX paths are limited to 107 bytes; the names in it are short
_BACKOFF_S = (0.5, 10.0)  # first and longest wait before a restart
_HEALTHY_S = 60.0  # up this long: the next death starts the backoff over
#: settings the supervisor decides per front end
_OWN = {"http_port", "grpc_port", "metrics_port", "ports_file", "frontends", "reuse_port",
        "config", "shared_workers"}  # fmt: skip


class _Frontend:
    def __init__(self, index: int, command: list[str], ports_file: Path) -> None:
        self.index, self.command, self.ports_file = index, command, ports_file
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = _BACKOFF_S[0]
        self.restart_at: float | None = None
        self.metrics_port = 0

    def start(self) -> None:
        self.ports_file.unlink(missing_ok=True)
        self.process = subprocess.Popen([*self.command, "--ports-file", str(self.ports_file)])
        self.started = time.monotonic()
        self.restart_at = None

    def listening(self) -> bool:
        try:
            ports = json.loads(self.ports_file.read_text())
        except (OSError, ValueError):
            return False
        self.metrics_port = int(ports["metrics"])
        return True


def run(config: Config) -> int:
    """Serve until SIGINT/SIGTERM; the exit code (the worst of the front ends')."""
    private = Path(tempfile.mkdtemp(prefix="kernelport-frontends-"))  # 0700
    if len(str(private)) > _SOCKET_DIR_MAX:  # a deep TMPDIR: socket paths must stay short
        shutil.rmtree(private, ignore_errors=True)
        private = Path(tempfile.mkdtemp(prefix="kp-", dir="/tmp"))
    broker = WorkerBroker(private)
    regions = RegionHub(private)  # its socket next to the broker's: the front ends find it
    try:
        return _run(config, private, broker)
    except RuntimeError as exc:
        print(f"kernelport: {exc}", file=sys.stderr)
        return 1
    finally:
        regions.stop()
        broker.stop()
        shutil.rmtree(private, ignore_errors=True)


def _run(config: Config, private: Path, broker: WorkerBroker) -> int:
    # Bound, never listening: the ports are held, and the kernel hands connections only to
    # the front ends that listen on them.
    held = [bind(config.host, config.http_port, True), bind(config.host, config.grpc_port, True)]
    http, grpc = (int(s.getsockname()[1]) for s in held)
    settings = private / "config.json"
    settings.touch(mode=0o600)  # API keys may be in it
    settings.write_text(config.model_dump_json(exclude=_OWN))
    base = [sys.executable, "-m", "kernelport", "serve", "--config", str(settings),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", "0",
            "--frontends", "1", "--reuse-port",
            "--shared-workers", str(broker.address)]  # fmt: skip
    frontends = [_Frontend(i, base, private / f"ports-{i}.json") for i in range(config.frontends)]
    stops = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stops
        stops += 1
        for f in frontends:
            if f.process is not None and f.process.poll() is None:
                f.process.send_signal(signal.SIGTERM if stops == 1 else signal.SIGINT)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    for f in frontends:
        f.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(f.listening() for f in frontends):
        dead = [f for f in frontends if f.process is not None and f.process.poll() is not None]
        if dead or stops or time.monotonic() > deadline:
            on_signal(signal.SIGTERM, None)
            _wait_all(frontends)
            why = "stopped" if stops else (
                f"front end {dead[0].index} exited with {dead[0].process.returncode}"  # type: ignore[union-attr]
                if dead else f"not listening within {START_TIMEOUT_S:g} s"
            )  # fmt: skip
            raise RuntimeError(f"--frontends {config.frontends}: startup failed: {why}")
        broker.check()
        time.sleep(0.05)
    metrics = [f.metrics_port for f in frontends]
    log.info("%d front ends listening: HTTP %s:%d, gRPC %s:%d, metrics %s",
             len(frontends), config.host, http, config.host, grpc, metrics)  # fmt: skip
    if config.ports_file is not None:
        write_ports(config.ports_file, {"http": http, "grpc": grpc, "metrics": metrics[0],
                                        "metrics_ports": metrics})  # fmt: skip
    return _supervise(frontends, lambda: stops, broker.check)


def _supervise(
    frontends: list[_Frontend], stops: Callable[[], int], check: Callable[[], None]
) -> int:
    while True:
        check()
        now = time.monotonic()
        if stops():
            return _wait_all(frontends)
        for f in frontends:
            assert f.process is not None
            if f.restart_at is not None:
                if now >= f.restart_at:
                    log.warning("front end %d: starting again", f.index)
                    f.start()
                continue
            if f.process.poll() is None:
                continue
            if now - f.started > _HEALTHY_S:
                f.backoff = _BACKOFF_S[0]
            log.error("front end %d exited with %s; restarting in %.1fs",
                      f.index, f.process.returncode, f.backoff)  # fmt: skip
            f.restart_at = now + f.backoff
            f.backoff = min(f.backoff * 2, _BACKOFF_S[1])
        time.sleep(0.1)


def _wait_all(frontends: list[_Frontend]) -> int:
    """Wait for every front end; 0 when all drained and stopped cleanly, else 1."""
    codes = [f.process.wait() for f in frontends if f.process is not None]
    return 1 if any(codes) else 0
