"""Shutdown always ends: a model that never returns cannot keep the process alive."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from conftest import start_server

FOREVER = """
import threading
from pathlib import Path

class Model:
    def load(self, config):
        self.started = Path(config.parameters["started"])

    def execute(self, inputs):
        self.started.write_text("executing")
        threading.Event().wait()  # never returns
"""


def test_sigterm_ends_a_server_stuck_in_a_model(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "sleepy" / "1").mkdir(parents=True)
    (repo / "sleepy" / "1" / "model.py").write_text(FOREVER)
    started = tmp_path / "started"
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "inputs": [{"name": "X", "datatype": "FP32", "dims": [1]}],
        "outputs": [{"name": "Y", "datatype": "FP32", "dims": [1]}],
        "parameters": {"started": str(started)},
    }
    (repo / "sleepy" / "model.yaml").write_text(yaml.safe_dump(config))
    server = start_server(tmp_path, repo, "--drain-timeout", "1", wait_for="ready")
    try:
        body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1],
                                       "data": [1.0]}]}).encode()  # fmt: skip
        url = f"http://{server.http_url}/v2/models/sleepy/infer"

        def call() -> None:
            # The server goes away under it: an error is expected.
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                urllib.request.urlopen(urllib.request.Request(url, body), timeout=60).close()

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        deadline = time.monotonic() + 30
        while not started.exists():  # the model signals that execute() has begun
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.01)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(1 + 5 + 1)  # drain timeout + 5 s, and a margin
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after SIGTERM:\n{server.log()}") from None
        assert time.monotonic() - sent < 6.5
        assert code != 0
        log = server.log()
        assert "sleepy" in log.split("drain gave up", 1)[1], log
        assert "exiting with models still executing: sleepy" in log, log
    finally:
        server.stop(signal.SIGKILL)


EMBEDDED = """
import asyncio, threading
import numpy as np
from kernelport.core.execution import Worker
from kernelport.core.model_config import parse_model_config

class Forever:
    def execute(self, inputs):
        threading.Event().wait()

    def unload(self):
        pass

async def main():
    config = parse_model_config({"name": "m", "backend": "identity", "max_batch_size": 0,
        "inputs": [{"name": "X", "datatype": "FP32", "dims": [1]}],
        "outputs": [{"name": "X", "datatype": "FP32", "dims": [1]}]}, "m")
    worker = Worker(Forever(), "m")
    future = worker.submit_batch([{"X": np.zeros(1, np.float32)}], [1], config)
    try:
        await asyncio.wait_for(asyncio.shield(future), 0.2)
    except TimeoutError:
        print("stuck as expected", flush=True)

asyncio.run(main())
"""


def test_a_stuck_worker_does_not_hold_interpreter_exit(tmp_path: Path) -> None:
    """Embedding the server without its CLI: worker threads must not be joined at exit."""
    script = tmp_path / "embedded.py"
    script.write_text(EMBEDDED)
    try:
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("the interpreter waited for a stuck worker thread") from None
    assert "stuck as expected" in done.stdout, done.stderr
