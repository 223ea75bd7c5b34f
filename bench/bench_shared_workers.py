"""``--frontends 2`` with a worker-mode model: a worker per front end (before) against one
worker shared by both front ends (after), alternating A/B rounds.

    PYTHONPATH=src .venv/bin/python bench/bench_shared_workers.py \
        --before /work/main/src --after src [--rounds 2] [--model mlp]

Each round starts ``kernelport serve --frontends 2 --model-execution worker`` once from each
source tree (``PYTHONPATH``), unpinned, waits for readiness, counts the worker processes
below the supervisor and their resident memory (VmRSS), and runs the built-in closed-loop
driver (``kernelport.benchmark.load``: one tritonclient connection per caller, so the
kernel spreads callers over both front ends) at each concurrency over HTTP. perf_analyzer
is not used here: it reads the model's statistics before and after each window, and with
two front ends those come from either one ("failed to find the requested model version").
The table gives each side's median and range.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_server import (  # bench/ is sys.path[0] when run as a script
    OUT_DIR,
    ROOT,
    free_ports,
    stop,
    wait_ready,
)
from make_models import PRESETS, build_repository

from kernelport.benchmark.bare import TensorSpec
from kernelport.benchmark.load import builtin_point

SIDES = ("before", "after")


def workers_below(pid: int) -> list[int]:
    """The ``kernelport.worker`` processes anywhere below ``pid``."""
    parents: dict[int, int] = {}
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        if b"kernelport.worker" in cmdline:
            workers.append(int(entry.name))
    below = []
    for worker in workers:
        up = parents.get(worker, 0)
        while up > 1 and up != pid:
            up = parents.get(up, 0)
        if up == pid:
            below.append(worker)
    return below


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_server(
    src: Path, repo: Path, work: Path, log: Path, args: argparse.Namespace
) -> dict[str, Any]:
    http_port, grpc_port = free_ports(2)
    cmd = [
        sys.executable, "-m", "kernelport", "serve", "--model-repository", str(repo),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", "0",
        "--frontends", "2", "--model-execution", "worker",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(src.resolve()))
    result: dict[str, Any] = {"command": shlex.join(cmd), "src": str(src), "runs": []}
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            wait_ready(proc, http_port, log, timeout=120)
            deadline = time.monotonic() + 60
            while "front ends listening" not in log.read_text():  # both front ends loaded
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.05)
            workers = workers_below(proc.pid)
            result["workers"] = len(workers)
            result["worker_rss_mb"] = round(sum(rss_mb(w) for w in workers), 1)
            for conc in args.concurrency:
                print(f"  http c={conc} ...", flush=True)
                spec = [TensorSpec("INPUT0", "FP32", args.shape)]
                point = builtin_point("mlp", "http", http_port, conc, spec, True, args.seconds)
                row = {"concurrency": conc, "infer_per_s": point.infer_per_s,
                       "p50_ms": point.p50_ms, "p99_ms": point.p99_ms}  # fmt: skip
                if point.error:
                    row["error"] = point.error
                result["runs"].append(row)
        finally:
            result["stopped"] = stop(proc)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--before", type=Path, required=True, help="src/ of the tree before")
    ap.add_argument("--after", type=Path, required=True, help="src/ of the tree after")
    ap.add_argument("--model", default="mlp", choices=sorted(PRESETS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    cli = ap.parse_args()
    args = argparse.Namespace(
        shape=PRESETS[cli.model][0], seconds=cli.seconds, concurrency=cli.concurrency
    )
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = build_repository(work / "repo", cli.model, batching_delay_us=0)
        for round_ in range(cli.rounds):
            for side in SIDES:
                print(f"round {round_ + 1}: {side}", flush=True)
                src = cli.before if side == "before" else cli.after
                log = work / f"server-{side}-{round_}.log"
                results[side].append(one_server(src, repo, work, log, args))
    print(report(results, cli.concurrency))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"shared-workers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}")


def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "failed"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(results: dict[str, list[dict[str, Any]]], concurrency: list[int]) -> str:
    lines = [
        "| side | workers | worker RSS MB | c | infer/s median (range) | p50 ms median (range) |",
        "|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        servers = results[side]
        count = sorted({s["workers"] for s in servers})
        rss = [s["worker_rss_mb"] for s in servers]
        for conc in concurrency:
            rows = [
                r
                for s in servers
                for r in s["runs"]
                if r["concurrency"] == conc and "error" not in r
            ]
            lines.append(
                f"| {side} | {count} | {_span(rss, '.0f')} | {conc} | "
                f"{_span([r['infer_per_s'] for r in rows], '.0f')} | "
                f"{_span([r['p50_ms'] for r in rows], '.3f')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
