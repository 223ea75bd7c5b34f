"""Build the benchmark models as a KernelPort model repository.

    python bench/make_models.py REPO_DIR

writes

    REPO_DIR/mlp/1/model.onnx   INPUT0 FP32 [-1,512] -> 3 x Gemm 512x512 (ReLU between)
                                -> OUTPUT0 FP32 [-1,512]
    REPO_DIR/mlp/model.yaml     onnxruntime, max_batch_size 128, 1 intra/inter-op thread

The weights are random but fixed (numpy default_rng(seed), N(0, 1/width); zero biases), so
every run serves the same function -- the same one as ../shared/tools/peers/make_models.py.
Inputs/outputs are not listed in model.yaml: the server derives them from the ONNX graph.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the lowest IR that carries opset 17; loadable by older onnxruntime builds

MLP_MODEL_YAML = """\
backend: onnxruntime
max_batch_size: 128
parameters:
  intra_op_threads: 1
  inter_op_threads: 1
"""


def _model(
    name: str,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    in_dims: list[int],
    out_dims: list[int],
) -> onnx.ModelProto:
    """FP32 INPUT0 [batch, *in_dims] -> OUTPUT0 [batch, *out_dims], checked."""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", *in_dims])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", *out_dims])
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kernelport-bench"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def mlp_model(width: int = 512, layers: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`layers` dense layers `width` wide; ReLU after every layer but the last."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cur = "INPUT0"
    for i in range(layers):
        last = i == layers - 1
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = np.zeros(width, np.float32)  # zero bias: same weights as the peers' mlp.onnx
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        gemm_out = "OUTPUT0" if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"B{i}"], [gemm_out], name=f"gemm{i}"))
        cur = gemm_out
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{i}"], name=f"relu{i}"))
            cur = f"relu{i}"
    return _model("mlp", nodes, inits, [width], [width])


def conv_model(channels: int = 48, size: int = 64, seed: int = 0) -> onnx.ModelProto:
    """A small CNN: INPUT0 [-1,3,size,size] -> 3 conv+ReLU -> global average pool -> 10 logits.

    Stands for the compute-bound regime: even batched, each image costs milliseconds.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    cur, c_in = "INPUT0", 3
    for i, (c_out, stride) in enumerate([(channels, 1), (2 * channels, 2), (2 * channels, 1)]):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(c_in * 9)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"K{i}"),
            numpy_helper.from_array(np.zeros(c_out, np.float32), f"KB{i}"),
        ]
        conv = helper.make_node(
            "Conv", [cur, f"K{i}", f"KB{i}"], [f"conv{i}"], pads=[1] * 4, strides=[stride] * 2
        )
        nodes.append(conv)
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"act{i}"]))
        cur, c_in = f"act{i}", c_out
    w = (rng.standard_normal((c_in, 10)) / np.sqrt(c_in)).astype(np.float32)
    inits += [
        numpy_helper.from_array(w, "FC"),
        numpy_helper.from_array(np.zeros(10, np.float32), "FCB"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [cur], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "FC", "FCB"], ["OUTPUT0"]),
    ]
    return _model("conv", nodes, inits, [3, size, size], [10])


# name -> (input shape without the batch dim, builder)
PRESETS = {
    "mlp": ((512,), lambda: mlp_model(512, 3)),  # tiny: server overhead dominates
    "wide": ((2048,), lambda: mlp_model(2048, 3)),  # 1.8 ms a row alone, 0.18 ms batched
    "conv": ((3, 64, 64), conv_model),  # compute-bound even batched
}


def build_mlp(path: str | Path, width: int = 512, layers: int = 3, seed: int = 0) -> Path:
    """Write the MLP to the ONNX file `path` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(mlp_model(width, layers, seed), str(path))
    return path


def build_repository(
    repo: str | Path,
    preset: str = "mlp",
    batching_delay_us: int | None = None,
    name: str = "mlp",
    extra_yaml: str = "",
) -> Path:
    """Write the preset's model (version 1 + model.yaml) into the repository dir `repo`.

    ``batching_delay_us``: None = no dynamic batching; else dynamic batching with that
    max_queue_delay. ``extra_yaml``: more model.yaml lines (e.g. "inline_below_us: 300").
    """
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(PRESETS[preset][1](), str(model_dir / "1" / "model.onnx"))
    text = MLP_MODEL_YAML
    if batching_delay_us is not None:
        text += f"dynamic_batching:\n  max_queue_delay_us: {batching_delay_us}\n"
    text += extra_yaml + ("\n" if extra_yaml and not extra_yaml.endswith("\n") else "")
    (model_dir / "model.yaml").write_text(text)
    return Path(repo)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("repo", type=Path, help="model repository directory to write into")
    args = ap.parse_args()
    repo = build_repository(args.repo)
    for f in sorted(p for p in repo.rglob("*") if p.is_file()):
        print(f"wrote {f} ({f.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
