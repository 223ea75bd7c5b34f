"""HTTP in process, quickly: RestApp over the bench's ASGI stand-in on a real DataPlane (the
`mlp` and identity models of bench_layers.py), pinned to one core under uvloop: the end-to-end
p50 at batch 1 and closed loops of 1 and 32 callers (µs of the core per request). One JSON
line, so A/B rounds between two trees alternate cheaply:

    for r in 1 2 3; do for t in /path/to/old /path/to/new; do
        (cd $t && PYTHONPATH=$t/src python bench/bench_http_loop.py); done; done
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import uvloop
from bench_layers import IDENTITY_YAML
from bench_server import parse_cpus
from bench_whatif import calls, closed_loop
from layer_timing import stats, timed
from make_models import build_repository  # bench/ is sys.path[0] when run as a script

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager


async def measure(repo: Path, n: int) -> dict[str, Any]:
    manager = ModelManager(ManagerSettings((repo,)), BackendRegistry())
    await manager.load_initial()
    out: dict[str, Any] = {}
    try:
        dp = DataPlane(manager, "bench")
        for model in ("mlp", "identity"):
            gc.collect()
            out[f"{model} p50 us"] = stats(await timed(calls(dp, model)["http"], n, n // 10))[
                "p50_us"
            ]
            for concurrency in (1, 32):
                loop = await closed_loop(dp, model, concurrency, n)
                out[f"{model} c={concurrency} us/req"] = loop["http"]["us_per_request"]
    finally:
        await manager.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="per measurement")
    parser.add_argument("--cpus", default="1", help='taskset-style cpus ("all": no pinning)')
    args = parser.parse_args()
    if args.cpus != "all":
        os.sched_setaffinity(0, parse_cpus(args.cpus))
    with tempfile.TemporaryDirectory(prefix="kp-http-loop-") as tmp:
        repo = build_repository(Path(tmp) / "repo", "mlp", batching_delay_us=0)
        (repo / "identity" / "1").mkdir(parents=True)
        (repo / "identity" / "model.yaml").write_text(IDENTITY_YAML)
        print(json.dumps(uvloop.run(measure(repo, args.requests))))


if __name__ == "__main__":
    main()
