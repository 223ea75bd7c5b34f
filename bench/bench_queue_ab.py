"""A/B of the core's request path between two source trees, in process, alternating rounds.

    PYTHONPATH=src .venv/bin/python bench/bench_queue_ab.py --a /tmp/old/src --b src --rounds 4

Each round runs one child process per tree (a, b, a, b, ...), pinned to --cpus under uvloop
like bench_layers.py, over the `mlp` model (dynamic batching, delay 0) and an identity model
of the same shape: the end-to-end p50 at c=1 for each front end (RestApp over in-memory
ASGI; the Python part of a gRPC call) and the in-process closed loop of 32 callers (µs of the
core per request, mean batch). Prints medians over rounds and the spread (min-max). Nothing
here depends on the trees' internals, so any two versions compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    """Measure the tree on sys.path; print one JSON line."""
    import uvloop
    from bench_layers import IDENTITY_YAML
    from bench_whatif import calls, closed_loop
    from layer_timing import stats, timed
    from make_models import build_repository

    from kernelport.backends.registry import BackendRegistry
    from kernelport.core.dataplane import DataPlane
    from kernelport.core.manager import ManagerSettings, ModelManager

    if args.cpus != "all":
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})

    async def measure(repo: Path) -> dict[str, Any]:
        manager = ModelManager(ManagerSettings((repo,)), BackendRegistry())
        await manager.load_initial()
        out: dict[str, Any] = {}
        try:
            dp = DataPlane(manager, "ab")
            for model in ("mlp", "identity"):
                for protocol, one in calls(dp, model).items():
                    got = stats(await timed(one, args.iterations, args.warmup))
                    out[f"{model} {protocol} c=1 p50 us"] = got["p50_us"]
                loop = await closed_loop(dp, model, 32, args.iterations)
                for protocol, got in loop.items():
                    out[f"{model} {protocol} c=32 us/request"] = got["us_per_request"]
                    out[f"{model} {protocol} c=32 mean batch"] = got["mean_batch"]
        finally:
            await manager.close()
        return out

    with tempfile.TemporaryDirectory(prefix="kp-ab-") as tmp:
        repo = build_repository(Path(tmp) / "repo", "mlp", batching_delay_us=0)
        (repo / "identity" / "1").mkdir(parents=True)
        (repo / "identity" / "model.yaml").write_text(IDENTITY_YAML)
        print(json.dumps(uvloop.run(measure(repo))))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--a", default="", help="source tree A (the src/ folder)")
    ap.add_argument("--b", default="", help="source tree B")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--cpus", default="1")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not (args.a and args.b):
        ap.error("--a and --b name the two source trees")
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for round_ in range(args.rounds):
        for name in ("a", "b"):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([getattr(args, name), str(HERE)]))
            cmd = [sys.executable, __file__, "--child", "--cpus", args.cpus,
                   "--iterations", str(args.iterations), "--warmup", str(args.warmup)]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name} done", file=sys.stderr, flush=True)
    print("| measure | A median (min-max) | B median (min-max) | B - A |")
    print("| --- | ---: | ---: | ---: |")
    for key in runs["a"][0]:
        a = [r[key] for r in runs["a"]]
        b = [r[key] for r in runs["b"]]
        ma, mb = statistics.median(a), statistics.median(b)
        print(
            f"| {key} | {ma:.1f} ({min(a):.1f}-{max(a):.1f}) | {mb:.1f} ({min(b):.1f}-{max(b):.1f})"
            f" | {mb - ma:+.1f} |"
        )


if __name__ == "__main__":
    main()
