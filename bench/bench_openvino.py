"""OpenVINO vs ONNX Runtime, bare (no server), on the same ONNX model, one thread each.

    .venv/bin/python bench/bench_openvino.py [--model mlp|wide|conv] [--seconds 2] [--rounds 3]

Builds the model with bench/make_models.py, then alternates rounds of ORT and OpenVINO calls
(CPU, one intra-op thread, latency hint) at each batch size and prints calls/s, rows/s and the
ratio OpenVINO / ORT (median of rounds). Both runtimes read the same model.onnx.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import openvino as ov
from make_models import build_repository  # bench/ is sys.path[0] when run as a script


def _ort(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _openvino(path: Path) -> Any:
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({p.get_any_name(): ov.PartialShape([-1, *p.get_partial_shape()[1:]])
                   for p in model.inputs})  # fmt: skip
    compiled = core.compile_model(
        model, "CPU",
        {"INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"},
    )  # fmt: skip
    request = compiled.create_infer_request()
    return lambda x: request.infer([x], share_inputs=True)


def _rate(call: Any, x: np.ndarray[Any, Any], seconds: float) -> float:
    for _ in range(20):
        call(x)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        call(x)
        calls += 1
    return calls / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build_repository(Path(tmp), args.model, name=args.model)
        path = Path(tmp) / args.model / "1" / "model.onnx"
        runtimes = {"onnxruntime": _ort(path), "openvino": _openvino(path)}
        shape = ort.InferenceSession(str(path)).get_inputs()[0].shape[1:]
        print("| model | batch | ORT calls/s | OpenVINO calls/s | OpenVINO / ORT |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            rates: dict[str, list[float]] = {name: [] for name in runtimes}
            for _ in range(args.rounds):
                for name, call in runtimes.items():
                    rates[name].append(_rate(call, x, args.seconds))
            a, b = (statistics.median(rates[n]) for n in ("onnxruntime", "openvino"))
            print(f"| {args.model} | {batch} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
