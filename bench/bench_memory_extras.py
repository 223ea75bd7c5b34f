"""Issue 13 (rest): what the new request-path work costs, and what compaction and the
self-sizing probe do (docs/memory.md, docs/composition.md).

    PYTHONPATH=src .venv/bin/python bench/bench_memory_extras.py [--old a1c0037] [--rounds 4]

1. Request path, old vs new code (``--old``: a commit whose ``src/`` is extracted to a temp
   directory): a Python model now gets its request's id and parameters (``RequestArrays``,
   one dict copy per request) and every request pays one more test in ``DataPlane._run``.
   Each round runs 3000 sequential ``DataPlane.infer`` calls, in process, on a Python echo
   model and on the ``mlp`` ONNX model, in a fresh interpreter per (code, round), old and
   new alternating; medians and spread of the mean microseconds per request.
2. Compaction: three on-demand copies of the ``wide`` MLP (48 MiB each) each run a batch of
   256 rows (ONNX Runtime's arena grows), then ``POST /v2/repository/compact``'s operation:
   the process's resident set before and after, and how long it took.
3. The probe: the first load of the ``wide`` model with a self-sizing budget (one extra
   zero-filled run per instance, plus the reading of memory) against a fixed budget, in
   alternating fresh managers; medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ECHO = """class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"]}
"""
ECHO_YAML = """backend: python
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [16]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [16]}]
"""
REQUESTS = 3000


async def _request_path(repo: Path) -> dict[str, float]:
    from kernelport.backends.registry import BackendRegistry
    from kernelport.core.dataplane import DataPlane
    from kernelport.core.manager import ManagerSettings, ModelManager
    from kernelport.types import InferRequest, Tensor

    manager = ModelManager(ManagerSettings((repo,)), BackendRegistry())
    await manager.load_initial()
    dp = DataPlane(manager, "bench")
    out = {}
    try:
        for model, width in (("echo", 16), ("mlp", 512)):
            x = np.ones((1, width), np.float32)
            request = InferRequest(model, id="r", inputs=[Tensor("INPUT0", "FP32", x.shape, x)])
            for _ in range(200):  # warm
                await dp.infer(request)
            started = time.perf_counter()
            for _ in range(REQUESTS):
                await dp.infer(request)
            out[model] = 1e6 * (time.perf_counter() - started) / REQUESTS
    finally:
        await manager.close()
    return out


def _child(repo: str) -> None:
    print(json.dumps(asyncio.run(_request_path(Path(repo)))))


def _write_request_repo(repo: Path) -> None:
    sys.path.insert(0, str(HERE))
    from make_models import build_repository

    build_repository(repo, "mlp", name="mlp")
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "model.yaml").write_text(ECHO_YAML)
    (repo / "echo" / "1" / "model.py").write_text(ECHO)


def _old_src(commit: str, into: Path) -> Path:
    archive = into / "old.tar"
    command = ["git", "archive", "-o", str(archive), commit, "src"]
    subprocess.run(command, check=True, cwd=HERE.parent)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def request_path_ab(commit: str, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        _write_request_repo(repo)
        sources = {"old": _old_src(commit, Path(tmp)), "new": HERE.parent / "src"}
        runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for _ in range(rounds):
            for label, src in sources.items():
                env = {**os.environ, "PYTHONPATH": str(src)}
                got = subprocess.run(
                    [sys.executable, __file__, "--child", str(repo)],
                    env=env, check=True, capture_output=True, text=True,
                )  # fmt: skip
                runs[label].append(json.loads(got.stdout.strip().splitlines()[-1]))
    print(f"request path, {REQUESTS} sequential in-process requests, {rounds} rounds each")
    print("| model | old us/request (median, range) | new us/request (median, range) | new/old |")
    print("| --- | ---: | ---: | ---: |")
    for model in ("echo", "mlp"):
        old = [r[model] for r in runs["old"]]
        new = [r[model] for r in runs["new"]]
        mo, mn = statistics.median(old), statistics.median(new)
        print(f"| {model} | {mo:.1f} ({min(old):.1f}-{max(old):.1f}) | {mn:.1f} "
              f"({min(new):.1f}-{max(new):.1f}) | {mn / mo:.3f} |")  # fmt: skip


def _wide_repo(repo: Path, names: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    from make_models import build_repository

    extra = "residency: on_demand\nparameters:\n  intra_op_threads: 1\n  inter_op_threads: 1\n"
    for name in names:
        build_repository(repo, "wide", name=name)
        config = repo / name / "model.yaml"
        lines = [
            line for line in config.read_text().splitlines()
            if not line.startswith(("parameters", "  intra", "  inter"))
        ]  # fmt: skip
        config.write_text("\n".join(lines) + "\n" + extra)


async def compaction() -> None:
    from kernelport.backends.registry import BackendRegistry
    from kernelport.core.dataplane import DataPlane
    from kernelport.core.manager import ManagerSettings, ModelManager
    from kernelport.types import InferRequest, Tensor

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        names = ["a", "b", "c"]
        _wide_repo(repo, names)
        settings = ManagerSettings((repo,), memory_budgets={"cpu": 1 << 40})
        manager = ModelManager(settings, BackendRegistry())
        await manager.load_initial()
        dp = DataPlane(manager, "bench")
        try:
            x = np.ones((256, 2048), np.float32)
            for name in names:
                await dp.infer(InferRequest(name, inputs=[Tensor("INPUT0", "FP32", x.shape, x)]))
            started = time.perf_counter()
            (report,) = await dp.compact()
            took = time.perf_counter() - started
        finally:
            await manager.close()
    before, after = report.process_bytes_before or 0, report.process_bytes_after or 0
    print(f"compaction of {len(report.models)} wide models after a 256-row batch each: "
          f"process RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
          f"({(after - before) / 2**20:+.1f} MiB) in {1e3 * took:.0f} ms")  # fmt: skip


async def _first_load(repo: Path, auto: bool) -> float:
    from kernelport.backends.registry import BackendRegistry
    from kernelport.core.manager import ManagerSettings, ModelManager
    from kernelport.core.memory_probe import available_host_memory

    kwargs = (
        {"memory_available": {"cpu": available_host_memory() or 1 << 34}}
        if auto
        else {"memory_budgets": {"cpu": 1 << 40}}
    )
    settings = ManagerSettings((repo,), control_mode="explicit", **kwargs)  # type: ignore[arg-type]
    manager = ModelManager(settings, BackendRegistry())
    try:
        started = time.perf_counter()
        await manager.load("a")
        return time.perf_counter() - started
    finally:
        await manager.close()


async def probe(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        _wide_repo(repo, ["a"])
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for auto in (False, True):
                times[auto].append(await _first_load(repo, auto))
    fixed, auto = statistics.median(times[False]), statistics.median(times[True])
    print(f"first load of the wide model (on_demand, loaded at model load), {rounds} rounds: "
          f"fixed budget {1e3 * fixed:.0f} ms (range {1e3 * min(times[False]):.0f}-"
          f"{1e3 * max(times[False]):.0f}), self-sizing {1e3 * auto:.0f} ms (range "
          f"{1e3 * min(times[True]):.0f}-{1e3 * max(times[True]):.0f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", default="a1c0037", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    request_path_ab(args.old, args.rounds)
    asyncio.run(compaction())
    asyncio.run(probe(args.rounds))


if __name__ == "__main__":
    main()
