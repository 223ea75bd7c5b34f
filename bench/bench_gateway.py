"""The gateway's cost: perf_analyzer against one node directly and through the gateway.

    PA_VENV=/path/to/.venv-pa .venv/bin/python bench/bench_gateway.py [--rounds 3]

1. writes a repository with one tiny identity model (FP32 [16], no batching), so that the
   figures are protocol and forwarding work, not model execution;
2. starts `kernelport serve` (the node) and `kernelport gateway` in front of it, on free
   ports, each polled until ready;
3. runs perf_analyzer over HTTP and gRPC at concurrency 1 (added latency) and 32
   (throughput), alternating direct and gateway runs in rounds (direct, gateway, direct, ...)
   so a busy machine's drift hits both alike; each run is `--measurement-mode count_windows
   --measurement-request-count N --stability-percentage 999` (never --request-count: it has
   a race that can hang perf_analyzer);
4. prints one markdown row per protocol x concurrency: medians over the rounds, the spread
   (min-max), and gateway/direct ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / "scripts" / "perf_analyzer"
MODEL = "ident"
SHAPE = [16]


def pinned(cmd: list[str], cpus: str) -> list[str]:
    return cmd if cpus == "all" else ["taskset", "-c", cpus, *cmd]


def wait_ready(
    process: subprocess.Popen[bytes], ports_file: Path, timeout: float = 60
) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"process exited with {process.returncode}")
        if ports_file.exists():
            ports = {k: int(v) for k, v in json.loads(ports_file.read_text()).items()}
            try:
                url = f"http://127.0.0.1:{ports['http']}/v2/health/ready"
                with urllib.request.urlopen(url, timeout=1):
                    return ports
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.05)
    sys.exit("not ready in time")


def perf_analyzer(
    protocol: str, port: int, conc: int, args: argparse.Namespace, work: Path
) -> dict[str, float]:
    out = work / f"pa-{protocol}-{port}-{conc}-{time.monotonic_ns()}.csv"
    cmd = pinned([
        str(PERF_ANALYZER), "-m", MODEL, "-i", protocol, "-u", f"127.0.0.1:{port}",
        "--concurrency-range", f"{conc}:{conc}", "--measurement-mode", "count_windows",
        "--measurement-request-count", str(args.requests), "--stability-percentage", "999",
        "--input-data", str(work / "input.json"), "-f", str(out),
    ], args.load_cpus)  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with out.open() as f:
        row = next(csv.DictReader(f))
    return {
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="direct/gateway pairs per point")
    parser.add_argument("--requests", type=int, default=200, help="requests per window")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--node-cpus", default="all", help='taskset -c list ("all": none)')
    parser.add_argument("--gateway-cpus", default="all", help='taskset -c list ("all": none)')
    parser.add_argument("--load-cpus", default="all", help='taskset -c list ("all": none)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "repo" / MODEL
        (model / "1").mkdir(parents=True)
        (model / "model.yaml").write_text(json.dumps({
            "backend": "identity", "max_batch_size": 0,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": SHAPE}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": SHAPE}],
        }))  # fmt: skip
        data = {"INPUT0": {"content": [float(i) for i in range(SHAPE[0])], "shape": SHAPE}}
        (work / "input.json").write_text(json.dumps({"data": [data]}))
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        base = [sys.executable, "-m", "kernelport"]
        free = ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"]
        node = subprocess.Popen(pinned([*base, "serve", *free, "--metrics-port", "0",
                                        "--model-repository", str(work / "repo"),
                                        "--ports-file", str(work / "node.json")], args.node_cpus),
                                env=env, stderr=subprocess.DEVNULL)  # fmt: skip
        processes = [node]
        try:
            node_ports = wait_ready(node, work / "node.json")
            spec = f"n=http://127.0.0.1:{node_ports['http']},grpc=127.0.0.1:{node_ports['grpc']}"
            gateway = subprocess.Popen(pinned([*base, "gateway", *free, "--node", spec,
                                               "--ports-file", str(work / "gw.json")],
                                              args.gateway_cpus),
                                       env=env, stderr=subprocess.DEVNULL)  # fmt: skip
            processes.append(gateway)
            gw_ports = wait_ready(gateway, work / "gw.json")
            results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
            for _ in range(args.rounds):
                for protocol in ("http", "grpc"):
                    for conc in args.concurrency:
                        for target, ports in (("direct", node_ports), ("gateway", gw_ports)):
                            row = perf_analyzer(protocol, ports[protocol], conc, args, work)
                            results.setdefault((protocol, conc, target), []).append(row)
                            print(protocol, conc, target, row, flush=True)
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(30)
    report(results, args)


def _spread(values: list[float], digits: int) -> str:
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def report(
    results: dict[tuple[str, int, str], list[dict[str, float]]], args: argparse.Namespace
) -> None:
    print(f"\n{args.rounds} rounds, {args.requests} requests per window; medians (min-max)\n")
    print("| protocol | c | direct infer/s | gateway infer/s | ratio | direct p50 ms | "
          "gateway p50 ms | added p50 ms |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for protocol in ("http", "grpc"):
        for conc in args.concurrency:
            direct, gateway = (
                results[(protocol, conc, "direct")],
                results[(protocol, conc, "gateway")],
            )
            d_t, g_t = ([r["infer_per_s"] for r in rows] for rows in (direct, gateway))
            d_l, g_l = ([r["p50_ms"] for r in rows] for rows in (direct, gateway))
            ratio = statistics.median(g_t) / statistics.median(d_t)
            added = statistics.median(g_l) - statistics.median(d_l)
            print(f"| {protocol} | {conc} | {_spread(d_t, 0)} | {_spread(g_t, 0)} | {ratio:.2f} | "
                  f"{_spread(d_l, 3)} | {_spread(g_l, 3)} | {added:+.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
