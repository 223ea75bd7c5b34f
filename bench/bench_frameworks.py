"""The server over each framework's bare runtime, as ratios, on one model: the `mlp` preset
(FP32 512x3, bench/make_models.py) as ONNX (ONNX Runtime), as a TensorFlow SavedModel and as
a jax.export program, as a bare StableHLO module (`model.mlir`, the same program's text), as an
OpenVINO model (the ONNX file read by OpenVINO) and as a torch.export program, with the same
weights.

    scripts/setup_perf_analyzer.sh                      # once
    .venv/bin/python bench/bench_frameworks.py [--rounds 2] [--frameworks onnxruntime jax]

Per round, for each framework in turn (so a busy machine hits every framework alike):
1. bare: the framework's own call in this process, pinned to --server-cpus, one intra/inter-op
   thread (TF's session callable, the compiled jax.jit executable, ORT's session.run):
   single-row calls/s (the c=1 reference) and rows/s at batch 32 (the c=32 reference);
2. server: `kernelport serve` pinned to --server-cpus with dynamic batching (delay 0),
   perf_analyzer over HTTP (--protocol) at c=1 and c=32 pinned to --load-cpus.
Prints per framework the median over rounds of server infer/s / bare reference, with the
spread (min-max), and writes bench/out/frameworks-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# TensorFlow's bare run comes before torch.export's Triton import: take Triton first (see
# kernelport/backends/tensorflow.py for why the other order aborts).
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401
from bench_server import (  # bench/ is sys.path[0] when run as a script
    OUT_DIR,
    free_ports,
    parse_cpus,
    pinned,
    run_perf_analyzer,
    stop,
    wait_ready,
    write_pa_input,
)
from make_models import build_repository
from onnx import numpy_helper

SHAPE = (512,)
MODEL_YAML = {
    "tensorflow": "backend: tensorflow\nparameters: {intra_op_threads: 1, inter_op_threads: 1}\n",
    "jax": "backend: jax\n",
    "stablehlo": "backend: jax\n",
    "openvino": "backend: openvino\nparameters: {INFERENCE_NUM_THREADS: '1'}\n",
    "torch": "backend: torch\n"
    "parameters: {INTRA_OP_THREAD_COUNT: '1', INTER_OP_THREAD_COUNT: '1'}\n",
}
# Input names: a bare StableHLO module names its tensors by position; torch by argument name
NAMES = {"stablehlo": ("INPUT__0",), "torch": ("input",)}  # nn.Sequential.forward(input)
FRAMEWORKS = ["onnxruntime", "tensorflow", "jax", "stablehlo", "openvino", "torch"]
COMMON_YAML = "max_batch_size: 128\ndynamic_batching:\n  max_queue_delay_us: 0\n"


def mlp_weights(repo: Path) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    model = onnx.load(str(repo / "mlp" / "1" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(inits[f"W{i}"], inits[f"B{i}"]) for i in range(3)]


def save_tensorflow(path: Path, layers: list[Any]) -> None:
    import tensorflow as tf

    module = tf.Module()
    module.vars = [(tf.Variable(w), tf.Variable(b)) for w, b in layers]

    def forward(INPUT0: Any) -> dict[str, Any]:  # the signature's input name
        x = INPUT0
        for i, (w, b) in enumerate(module.vars):
            x = x @ w + b
            x = tf.nn.relu(x) if i < len(module.vars) - 1 else x
        return {"OUTPUT0": x}

    module.serve = tf.function(forward, [tf.TensorSpec([None, *SHAPE], tf.float32, "INPUT0")])
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def save_jax(path: Path, layers: list[Any]) -> None:
    import jax
    from jax import export

    def forward(inputs: dict[str, Any]) -> dict[str, Any]:
        x = inputs["INPUT0"]
        for i, (w, b) in enumerate(layers):
            x = x @ w + b
            x = jax.nn.relu(x) if i < len(layers) - 1 else x
        return {"OUTPUT0": x}

    (batch,) = export.symbolic_shape("b")
    spec = {"INPUT0": jax.ShapeDtypeStruct((batch, *SHAPE), np.float32)}
    path.write_bytes(export.export(jax.jit(forward))(spec).serialize())


def save_stablehlo(path: Path, layers: list[Any]) -> None:
    import jax
    from jax import export

    def forward(x: Any) -> Any:
        for i, (w, b) in enumerate(layers):
            x = x @ w + b
            x = jax.nn.relu(x) if i < len(layers) - 1 else x
        return x

    (batch,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, *SHAPE), np.float32)
    path.write_text(export.export(jax.jit(forward))(spec).mlir_module())


def save_torch(path: Path, layers: list[Any]) -> None:
    import torch

    linears = []
    for w, b in layers:
        linear = torch.nn.Linear(*w.shape)
        linear.weight.data = torch.from_numpy(w.T.copy())
        linear.bias.data = torch.from_numpy(b.copy())
        linears += [linear, torch.nn.ReLU()]
    module = torch.nn.Sequential(*linears[:-1]).eval()
    dim = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: dim},))
    torch.export.save(program, str(path))


def build(root: Path, framework: str) -> Path:
    repo = root / framework
    build_repository(repo, "mlp", batching_delay_us=0)
    if framework == "onnxruntime":
        return repo
    version = repo / "mlp" / "1"
    (repo / "mlp" / "model.yaml").write_text(MODEL_YAML[framework] + COMMON_YAML)
    if framework == "openvino":
        return repo  # OpenVINO reads the same model.onnx
    layers = mlp_weights(repo)
    (version / "model.onnx").unlink()
    if framework == "tensorflow":
        save_tensorflow(version / "model.savedmodel", layers)
    elif framework == "stablehlo":
        save_stablehlo(version / "model.mlir", layers)
    elif framework == "torch":
        save_torch(version / "model.pt2", layers)
    else:
        save_jax(version / "model.jax_export", layers)
    return repo


def bare_call(framework: str, repo: Path, batch: int) -> Callable[[np.ndarray[Any, Any]], Any]:
    version = repo / "mlp" / "1"
    if framework == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(version / "model.onnx"), so, ["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"INPUT0": x})
    if framework == "tensorflow":
        import tensorflow as tf

        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=1, inter_op_parallelism_threads=1
        )
        config.use_per_session_threads = True
        graph = tf.Graph()
        sess = tf.compat.v1.Session(graph=graph, config=config)
        with graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(
                sess, ["serve"], str(version / "model.savedmodel")
            )
        sig = meta.signature_def["serving_default"]
        fn = sess.make_callable([sig.outputs["OUTPUT0"].name], [sig.inputs["INPUT0"].name])
        return lambda x: fn(x)
    if framework == "openvino":
        import openvino as ov

        compiled_ov = ov.Core().compile_model(
            str(version / "model.onnx"), "CPU", {"INFERENCE_NUM_THREADS": 1}
        )
        request = compiled_ov.create_infer_request()
        return lambda x: request.infer({"INPUT0": x})
    if framework == "torch":
        import torch

        torch.set_num_threads(1)
        module = torch.export.load(str(version / "model.pt2")).module()

        def call(x: np.ndarray[Any, Any]) -> Any:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return call
    import jax
    from jax import export

    if framework == "stablehlo":
        from kernelport.backends.stablehlo import as_exported

        module = as_exported(version / "model.mlir", "cpu")
        one = jax.ShapeDtypeStruct((batch, *SHAPE), np.float32)
        compiled_shlo = jax.jit(module.call).lower(one).compile()
        return lambda x: np.asarray(compiled_shlo(x))
    program = export.deserialize(bytearray((version / "model.jax_export").read_bytes()))
    spec = {"INPUT0": jax.ShapeDtypeStruct((batch, *SHAPE), np.float32)}
    compiled = jax.jit(program.call).lower(spec).compile()
    return lambda x: np.asarray(compiled({"INPUT0": x})["OUTPUT0"])


def rate(call: Callable[[Any], Any], batch: int, seconds: float) -> float:
    """Rows per second of back-to-back calls at `batch` rows."""
    x = np.random.default_rng(0).standard_normal((batch, *SHAPE)).astype(np.float32)
    for _ in range(20):
        call(x)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        call(x)
        calls += 1
    return calls * batch / elapsed


def bare(framework: str, repo: Path, args: argparse.Namespace) -> dict[int, float]:
    old = os.sched_getaffinity(0)
    if args.server_cpus != "all":
        os.sched_setaffinity(0, parse_cpus(args.server_cpus))
    try:
        return {b: rate(bare_call(framework, repo, b), b, args.bare_seconds) for b in (1, 32)}
    finally:
        os.sched_setaffinity(0, old)


def served(repo: Path, work: Path, args: argparse.Namespace) -> dict[int, float]:
    http_port, grpc_port, metrics_port = free_ports(3)
    cmd = pinned([
        args.python, "-m", "kernelport", "serve", "--model-repository", str(repo),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port), *shlex.split(args.extra_server_args),
    ], args.server_cpus)  # fmt: skip
    log = work / "server.log"
    out: dict[int, float] = {}
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, http_port, log, timeout=120)
            port = grpc_port if args.protocol == "grpc" else http_port
            for conc in (1, 32):
                row = run_perf_analyzer(args.protocol, port, conc, args, work)
                out[conc] = float(row.get("infer_per_s", float("nan")))
        finally:
            stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add = ap.add_argument
    add("--frameworks", nargs="+", default=FRAMEWORKS, choices=FRAMEWORKS)
    add("--rounds", type=int, default=2)
    add("--protocol", choices=["http", "grpc"], default="http")
    add("--python", default=sys.executable)
    add("--server-cpus", default="1")
    add("--load-cpus", default="0")
    add("--bare-seconds", type=float, default=2.0)
    add("--measurement-ms", type=int, default=2000)
    # On a shared machine perf_analyzer's 10% stability may never come: take its windows as
    # they are (999) and let the median over rounds deal with the noise.
    add("--stability", type=float, default=999)
    add("--max-trials", type=int, default=5)
    add("--extra-server-args", default="")
    args = ap.parse_args()
    args.shape, args.current_batching = SHAPE, "on"
    results: dict[str, list[dict[str, float]]] = {f: [] for f in args.frameworks}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repos = {f: build(root, f) for f in args.frameworks}
        for r in range(args.rounds):
            for framework in args.frameworks:
                work = root / f"work-{framework}-{r}"
                work.mkdir()
                write_pa_input(work / "pa_input.json", SHAPE)
                name = NAMES.get(framework, ("INPUT0",))[0]
                text = (work / "pa_input.json").read_text().replace('"INPUT0"', f'"{name}"')
                (work / "pa_input.json").write_text(text)
                rows = bare(framework, repos[framework], args)
                server = served(repos[framework], work, args)
                point = {
                    "bare_c1_rows_s": rows[1],
                    "bare_b32_rows_s": rows[32],
                    "server_c1": server[1],
                    "server_c32": server[32],
                    "ratio_c1": server[1] / rows[1],
                    "ratio_c32": server[32] / rows[32],
                }
                results[framework].append(point)
                rounded = {k: round(v, 3) for k, v in point.items()}
                print(framework, f"round {r + 1}:", json.dumps(rounded), flush=True)
    print(
        "\n| framework | bare 1 row/call | bare rows/s at b=32 | server c=1 | server c=32 "
        "| c=1 ratio (min-max) | c=32 ratio (min-max) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for framework, points in results.items():
        points = [p for p in points if not any(v != v for v in p.values())] or points  # NaN
        med = {k: statistics.median(p[k] for p in points) for k in points[0]}

        def spread(key: str, points: list[dict[str, float]] = points) -> str:
            return f"{min(p[key] for p in points):.2f}-{max(p[key] for p in points):.2f}"

        print(f"| {framework} | {med['bare_c1_rows_s']:.0f} | {med['bare_b32_rows_s']:.0f} "
              f"| {med['server_c1']:.0f} | {med['server_c32']:.0f} "
              f"| {med['ratio_c1']:.2f}x ({spread('ratio_c1')}) "
              f"| {med['ratio_c32']:.2f}x ({spread('ratio_c32')}) |")  # fmt: skip
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"frameworks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args) | {"shape": list(SHAPE)}, "results": results}))
    print("wrote", out)


if __name__ == "__main__":
    main()
