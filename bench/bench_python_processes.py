"""A GIL-bound Python model with two instances: threads of one process against a process each.

    PA_VENV=.venv-pa .venv/bin/python bench/bench_python_processes.py [--rounds 2]
        [--work-ms 2] [--concurrency 4] [--measurement-ms 3000]

The model spends ``--work-ms`` of pure-Python work per request (it holds the GIL), with
``instance_count: 2`` and no batching. The server runs it in process, in one worker process
(``execution.processes: model``: two instance threads share one GIL) and in a worker process
per instance (``instance``, the default for python models: each has its own GIL), each with
the machine's cores unpinned, perf_analyzer at ``--concurrency``. Prints infer/s and p50 for
each, rounds alternating. Two instances can use two cores only in separate processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench_server import PERF_ANALYZER, ROOT, free_ports, stop  # bench/ is sys.path[0]

MODEL = """
import time

import numpy as np

WORK_S = {work_s!r}


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        end = time.perf_counter() + WORK_S
        n = 0
        while time.perf_counter() < end:  # pure Python: holds the GIL throughout
            n += 1
        return {{"OUTPUT0": x * 2}}
"""

MODES = {
    "in_process": {"mode": "in_process"},
    "worker, one process": {"mode": "worker", "processes": "model"},
    "worker, a process per instance": {"mode": "worker", "processes": "instance"},
}


def write_repository(root: Path, work_s: float, execution: dict[str, str]) -> Path:
    model = root / "spin"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(MODEL.format(work_s=work_s))
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "instance_count": 2,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [16]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [16]}],
        "execution": execution,
    }
    (model / "model.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root


def ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/v2/models/spin/ready"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    sys.exit("the server did not get ready")


def run(args: argparse.Namespace, label: str, work: Path) -> tuple[float, float]:
    repo = write_repository(work / label.replace(" ", "_").replace(",", ""), args.work_ms / 1e3,
                            MODES[label])  # fmt: skip
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "kernelport", "serve", "--model-repository", str(repo),
           "--http-port", str(http), "--grpc-port", str(grpc),
           "--metrics-port", str(metrics)]  # fmt: skip
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        ready(http, proc)
        csv = work / "pa.csv"
        pa = [str(PERF_ANALYZER), "-m", "spin", "-i", "grpc", "-u", f"127.0.0.1:{grpc}",
              "--concurrency-range", f"{args.concurrency}:{args.concurrency}",
              "-p", str(args.measurement_ms), "-s", "25", "-r", "6", "-f", str(csv)]  # fmt: skip
        done = subprocess.run(pa, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"perf_analyzer failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        header, row = csv.read_text().splitlines()[:2]
        values = dict(zip(header.split(","), row.split(","), strict=False))
        return float(values["Inferences/Second"]), float(values["p50 latency"]) / 1e3
    finally:
        stop(proc)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work-ms", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--measurement-ms", type=int, default=3000)
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for label in MODES:
                work = Path(tmp) / f"r{round_}"
                work.mkdir(exist_ok=True)
                results[label].append(run(args, label, work))
                print(f"round {round_ + 1} {label}: {results[label][-1]}", flush=True)
    print(f"\n{args.work_ms} ms of Python per request, 2 instances, c={args.concurrency}\n")
    print("| execution | infer/s median (range) | p50 ms median |")
    print("| --- | ---: | ---: |")
    for label, runs in results.items():
        rates = [r for r, _ in runs]
        p50 = statistics.median(p for _, p in runs)
        print(f"| {label} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) "
              f"| {p50:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
