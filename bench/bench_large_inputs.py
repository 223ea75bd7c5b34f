"""Large inputs over gRPC and HTTP: FP16 images (3x224x224, 301 KB each) in requests of 1 and
64 images (19 MB), answered with 1000 values per image, so the cost measured is the
request's way in. The model is a Python model that slices its input (no framework time).

    .venv/bin/python bench/bench_large_inputs.py [--seconds 5] [--transports asyncio grpcio]

The server runs on core 1 (``taskset``), the load (tritonclient's aio clients, one process)
on core 0. Printed per point: requests/s, MB/s of request bodies, and the server's CPU time
per request and per MB (from /proc: the load generator can be the limit on two cores, the
server's CPU per MB is the figure a transport change moves).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL_YAML = """backend: python
max_batch_size: 256
inputs:
  - {name: x, datatype: FP16, dims: [3, 224, 224]}
outputs:
  - {name: OUTPUT0, datatype: FP16, dims: [1000]}
dynamic_batching: {max_queue_delay_us: 0}
"""
MODEL_PY = """class Model:
    def execute(self, inputs):
        x = inputs["x"]
        return {"OUTPUT0": x.reshape(x.shape[0], -1)[:, :1000].copy()}
"""


def load(protocol: str, port: int, batch: int, concurrency: int, seconds: float) -> float:
    """Closed-loop requests per second from ``concurrency`` loops on one client."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as client_module
    else:
        import tritonclient.http.aio as client_module  # type: ignore[no-redef]

    async def run() -> float:
        client = client_module.InferenceServerClient(f"127.0.0.1:{port}")
        image = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float16)
        item = client_module.InferInput("x", list(image.shape), "FP16")
        item.set_data_from_numpy(image)
        await client.infer("big", [item])
        done = 0
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await client.infer("big", [item])
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        await client.close()
        return done / elapsed

    return asyncio.run(run())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(repo: Path, transport: str, work: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports_file = work / f"ports-{transport}.json"
    cmd = ["taskset", "-c", "1", sys.executable, "-m", "kernelport", "serve",
           "--model-repository", str(repo), "--grpc-transport", transport, "--host", "127.0.0.1",
           "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
           "--ports-file", str(ports_file)]  # fmt: skip
    log = open(work / f"server-{transport}.log", "wb")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ports_file.exists() or not ports_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((work / f"server-{transport}.log").read_text())
        time.sleep(0.05)
    return proc, json.loads(ports_file.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--transports", nargs="+", default=["asyncio", "grpcio"])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory(prefix="kp-large-") as tmp:
        work = Path(tmp)
        (work / "repo" / "big" / "1").mkdir(parents=True)
        (work / "repo" / "big" / "model.yaml").write_text(MODEL_YAML)
        (work / "repo" / "big" / "1" / "model.py").write_text(MODEL_PY)
        print("| server gRPC transport | protocol | images/request | concurrency | req/s | MB/s "
              "| server CPU ms/request | server CPU ms/MB |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for _ in range(args.rounds):
            for transport in args.transports:
                proc, ports = serve(work / "repo", transport, work)
                try:
                    points = [("grpc", 64, 4), ("grpc", 1, 8)]
                    if transport == args.transports[0]:  # HTTP does not depend on it
                        points += [("http", 64, 4), ("http", 1, 8)]
                    for protocol, batch, concurrency in points:
                        port = ports["grpc" if protocol == "grpc" else "http"]
                        before = cpu_seconds(proc.pid)
                        rate = load(protocol, port, batch, concurrency, args.seconds)
                        used = cpu_seconds(proc.pid) - before
                        requests = rate * args.seconds
                        mb = batch * 3 * 224 * 224 * 2 / 1e6
                        print(f"| {transport} | {protocol} | {batch} | {concurrency} | {rate:,.1f} "
                              f"| {rate * mb:,.0f} | {1000 * used / requests:.3f} "
                              f"| {1000 * used / (requests * mb):.3f} |", flush=True)  # fmt: skip
                finally:
                    proc.terminate()
                    proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
