"""One cluster slot: a KernelPort node (``kernelport serve``) in a child process.

The controller runs this class as a Ray actor, one per CPU slot or GPU. The node is a child
process rather than a server inside the actor because the server owns its event loop, its
signal handlers (drain on SIGTERM) and its own worker processes, none of which sit well
inside a Ray worker; and because a crash of either side is then visible to the other: the
child gets SIGKILL when the actor's process dies (``PR_SET_PDEATHSIG``), and the actor's
heartbeat reports a child that exited. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable), or of the slot's GPU."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))  # pragma: no cover


def model_sizes(repository: Path) -> dict[str, int]:
    """Each model directory's size on disk: the memory estimate placement packs by."""
    sizes: dict[str, int] = {}
    for entry in sorted(repository.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            files = (p for p in entry.rglob("*") if p.is_file())
            sizes[entry.name] = sum(p.stat().st_size for p in files)
    return sizes


class NodeServer:
    """Starts ``kernelport serve`` (explicit model control, ports chosen by the OS) and
    reports where it listens; ``heartbeat()`` says whether it still runs."""

    def __init__(
        self,
        name: str,
        repository: str,
        host: str,
        slots_on_machine: int = 1,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.host = host
        self.repository = Path(repository)
        self.slots_on_machine = max(1, slots_on_machine)
        self._dir = tempfile.mkdtemp(prefix="kernelport-slot-")
        ports_file = Path(self._dir) / "ports.json"
        self._log = open(Path(self._dir) / "serve.log", "wb")  # noqa: SIM115 - child's output
        command = [
            sys.executable, "-m", "kernelport", "serve",
            "--model-repository", str(self.repository),
            "--model-control-mode", "explicit",
            "--host", host,
            "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
            "--readiness", "any",
            "--ports-file", str(ports_file),
            *extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + start_timeout
        # Startup, not the request path: the ports file appears once the node listens.
        while not ports_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"slot {name}: kernelport serve did not start: {tail}")
            time.sleep(0.05)
        self.ports: dict[str, int] = json.loads(ports_file.read_text())

    def info(self) -> dict[str, Any]:
        """Where the node listens, its pids, free memory and devices, and its models' sizes."""
        return {
            "name": self.name,
            "http": f"http://{self.host}:{self.ports['http']}",
            "grpc": f"{self.host}:{self.ports['grpc']}",
            "pid": os.getpid(),
            "server_pid": self.process.pid,
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "free_memory": self.free_memory(),
            "model_sizes": model_sizes(self.repository),
        }

    def free_memory(self) -> int:
        """This slot's share of the machine's available memory."""
        return free_memory() // self.slots_on_machine

    def heartbeat(self) -> dict[str, Any]:
        return {"alive": self.process.poll() is None, "free_memory": self.free_memory()}

    def log_tail(self, size: int = 2000) -> str:
        if not self._log.closed:
            self._log.flush()
        return (Path(self._dir) / "serve.log").read_bytes()[-size:].decode(errors="replace")

    def stop(self) -> None:
        """Ask the node to drain and stop (SIGTERM), then make sure it is gone."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a node that ignores SIGTERM
                self.process.kill()
                self.process.wait()
        self._log.close()
