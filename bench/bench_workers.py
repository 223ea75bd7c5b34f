"""In-process vs worker-process execution of the tiny `mlp`, one server core, A/B rounds.

    PA_VENV=/work/main/.venv-pa .venv/bin/python bench/bench_workers.py [--rounds 2] [--compiled]

Each round starts the server twice under `taskset -c <server-cpus>` (the worker process
inherits the pinning, so both modes get the same single core), `--model-execution
in_process` then `worker`, with dynamic batching on, and runs perf_analyzer (pinned to
--load-cpus) at c=1 and c=32 over HTTP. Alternating rounds (old, new, old, new) spread a
shared machine's noise over both modes; the table gives each mode's median and range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_server import (  # bench/ is sys.path[0] when run as a script
    OUT_DIR,
    bench_server,
    compile_request_path,
)
from make_models import PRESETS, build_repository

MODES = ("in_process", "worker")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--server-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--measurement-ms", type=int, default=2000)
    ap.add_argument("--protocols", nargs="+", default=["http"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--compiled", action="store_true", help="serve the compiled request path")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    cli = ap.parse_args()
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        compiled_dir = compile_request_path(work / "compiled") if cli.compiled else ""
        repo = build_repository(work / "repo", "mlp", batching_delay_us=0)
        for round_ in range(cli.rounds):
            for mode in cli.modes:
                args = argparse.Namespace(
                    python=sys.executable,
                    current_batching="on",
                    extra_server_args=f"--model-execution {mode}",
                    server_cpus=cli.server_cpus,
                    load_cpus=cli.load_cpus,
                    protocols=cli.protocols,
                    concurrency=cli.concurrency,
                    shape=PRESETS["mlp"][0],
                    measurement_ms=cli.measurement_ms,
                    stability=10,
                    max_trials=5,
                    compiled_dir=compiled_dir,
                )
                print(f"round {round_ + 1}: {mode}", flush=True)
                log = work / f"server-{mode}-{round_}.log"
                results[mode].extend(bench_server(repo, work, log, args)["runs"])
    print(report(results, cli.concurrency, cli.protocols, cli.modes))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"workers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}")


def report(
    results: dict[str, list[dict[str, Any]]],
    concurrency: list[int],
    protocols: list[str],
    modes: list[str],
) -> str:
    lines = [
        "| protocol | c | mode | infer/s median (range) | p50 ms median (range) | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for protocol in protocols:
        for conc in concurrency:
            for mode in modes:
                rows = [
                    r
                    for r in results[mode]
                    if r["protocol"] == protocol and r["concurrency"] == conc and "error" not in r
                ]
                if not rows:
                    lines.append(f"| {protocol} | {conc} | {mode} | failed | | 0 |")
                    continue
                rate = [r["infer_per_s"] for r in rows]
                p50 = [r["p50_ms"] for r in rows]
                lines.append(
                    f"| {protocol} | {conc} | {mode} | {statistics.median(rate):.0f} "
                    f"({min(rate):.0f}-{max(rate):.0f}) | {statistics.median(p50):.3f} "
                    f"({min(p50):.3f}-{max(p50):.3f}) | {len(rows)} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
