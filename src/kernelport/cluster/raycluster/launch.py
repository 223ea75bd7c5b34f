"""Starting this machine's Ray node (head or worker) as a child process we own.

``ray start --block`` stays in the foreground: its pid is ours to stop, and stopping it
(SIGTERM) stops every Ray process it started, on this session only; ``ray stop`` would kill
every Ray process on the machine by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"


def auth_env(token: str | None) -> dict[str, str]:
    """Ray's own token authentication (Ray 2.52+): every Ray RPC carries the token."""
    return {AUTH_MODE: "token", AUTH_TOKEN: token} if token else {}


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"token file {path}: the token must be at least 16 characters")
    return token


def ray_start_command(
    *,
    head: bool,
    address: str | None = None,
    port: int = 6379,
    node_ip: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_bytes: int | None = None,
    temp_dir: str | None = None,
    system_config: Mapping[str, object] | None = None,
) -> list[str]:
    """The ``ray start ... --block`` command line for this machine's node."""
    command = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start"]
    if head:
        command += ["--head", "--port", str(port), "--include-dashboard", "false"]
        if temp_dir is not None:
            command += ["--temp-dir", temp_dir]
        if system_config:
            command += ["--system-config", json.dumps(dict(system_config))]
    else:
        assert address is not None
        command += ["--address", address]
    if node_ip is not None:
        command += ["--node-ip-address", node_ip]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    if object_store_bytes is not None:
        command += ["--object-store-memory", str(object_store_bytes)]
    return [*command, "--disable-usage-stats", "--block"]


def start_ray(
    command: list[str], token: str | None, log: Path | None, own_session: bool = True
) -> subprocess.Popen[bytes]:
    """Run ``command`` (in a session of its own unless not ``own_session``)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **auth_env(token)}
    with contextlib.ExitStack() as stack:  # the child keeps its own copy of the log's fd
        out = stack.enter_context(open(log, "ab")) if log is not None else subprocess.DEVNULL
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=own_session, preexec_fn=_stop_with_parent,
        )  # fmt: skip


def _stop_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # SIGTERM, not SIGKILL: ray start --block then stops the Ray processes it started
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_ray(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to ``ray start --block`` (it stops its node's processes), then SIGKILL to the
    session it leads if that has not ended it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # its session only (own_session)
            process.wait()
