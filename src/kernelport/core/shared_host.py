"""A front end's side of a model worker that every front end of ``--frontends N`` shares.

The front-end supervisor starts and restarts the worker (``hosting/shared_workers.py``);
this process only asks it where the worker listens (once, by a key naming the model version
and its exact settings), connects, and hands the worker its own arena's descriptor
(``SCM_RIGHTS``). Everything else is :class:`ProcessHost`'s: the same frames, the same arena
layout, the same batches. What differs is death: the socket's EOF fails this front end's
batches with UNAVAILABLE and it connects again; the supervisor, not this process, starts the
new worker (once for all front ends), and the connection waits in the listening socket's
backlog until that worker accepts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
from pathlib import Path

from kernelport.core.arena import Arena
from kernelport.core.model_config import ModelConfig
from kernelport.core.process_host import ProcessHost
from kernelport.errors import unavailable

log = logging.getLogger("kernelport.workers")

RECONNECT_S = 0.05  # the supervisor restarts the worker; our connection waits in its backlog
ASK_TIMEOUT_S = 30.0


class SharedHost(ProcessHost):
    """A model version's worker, shared with the other front ends through ``broker``."""

    def __init__(
        self,
        config: ModelConfig,
        path: Path,
        devices: list[str],
        timeout_s: float | None,
        arena_bytes: int,
        broker: Path,
        part: int = 0,
    ) -> None:
        """``part``: which of the version's processes this is (``execution.processes``)."""
        super().__init__(config, path, devices, timeout_s, arena_bytes)
        self._broker = broker
        self._address = ""
        settings = {
            "config": config.model_dump(mode="json"),
            "path": str(path),
            "devices": devices,
            "timeout_s": timeout_s,
            "part": part,
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        self.key = f"{config.name}/{digest[:24]}"

    async def start(self) -> list[list[str]]:
        self._address = await ask_broker(self._broker, self.key, self.config.name)
        return await super().start()

    def _connect(self, arena: Arena) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._address)  # immediate: the supervisor's socket has a backlog
            socket.send_fds(sock, [b"\0"], [arena.fd])
        except OSError:
            sock.close()
            raise
        return sock

    def _kill(self) -> None:
        # A stuck batch: the worker is killed for every front end (the others get
        # UNAVAILABLE for theirs), and the supervisor starts the next one.
        with contextlib.suppress(OSError):  # already gone
            os.kill(self.pid, signal.SIGKILL)

    def _lost(self) -> None:
        name = self.config.name
        how = self._killed_for or f"pid {self.pid} ended"
        self._killed_for = ""
        self._close_channel()
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(unavailable(f"model '{name}' worker went away ({how})"))
        if not self._ever_up:  # the first load failed: the model fails to load here
            return
        log.error("model '%s' shared worker went away (%s); reconnecting", name, how)
        self._fail_all(unavailable(f"model '{name}' worker died ({how}); restarting"))
        self.restarts += 1
        self._restart = self._loop.call_later(RECONNECT_S, self._respawn)


async def ask_broker(broker: Path, key: str, model: str) -> str:
    """The address of the worker for ``key``, started by the supervisor if need be."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(broker)), ASK_TIMEOUT_S
        )
        try:
            writer.write(json.dumps({"key": key, "model": model}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), ASK_TIMEOUT_S)
        finally:
            writer.close()
        reply = json.loads(line)
        return str(reply["address"])
    except (OSError, ValueError, KeyError, TimeoutError) as exc:
        raise unavailable(
            f"model '{model}': the front-end supervisor did not start its shared worker "
            f"({type(exc).__name__}: {exc})"
        ) from None
