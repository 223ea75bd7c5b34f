"""Writes the bundled demo repository (src/kernelport/demo_repository).

ONNX models are built with the onnx helper API, the PyTorch model with torch.export and the
Python model is written out as source.

Run: python scripts/make_demo_models.py   (needs the `onnx` and `torch` packages; weights are
seeded, so the models compute the same thing on every run)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
# The lowest IR version that carries opset 17: onnx's helper writes its newest, which older
# onnxruntime builds refuse (1.30 reads at most IR 13; onnx 1.23 writes 14).
IR_VERSION = 8
ROOT = Path(__file__).resolve().parents[1] / "src" / "kernelport" / "demo_repository"


def save(model: onnx.ModelProto, name: str, yaml_text: str) -> None:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    version = ROOT / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(version / "model.onnx"))
    (ROOT / name / "model.yaml").write_text(yaml_text)


def simple() -> None:
    """Triton's classic `simple`: INT32 [-1,16] x2 -> sum and difference."""
    a = helper.make_tensor_value_info("INPUT0", TensorProto.INT32, ["batch", 16])
    b = helper.make_tensor_value_info("INPUT1", TensorProto.INT32, ["batch", 16])
    s = helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, ["batch", 16])
    d = helper.make_tensor_value_info("OUTPUT1", TensorProto.INT32, ["batch", 16])
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [a, b],
        [s, d],
    )
    save(
        helper.make_model(graph, opset_imports=OPSET, producer_name="kernelport-demo"),
        "simple",
        "# Triton's classic example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1\n"
        "backend: onnxruntime\nmax_batch_size: 8\n",
    )


def simple_string() -> None:
    """BYTES [-1,16] x2 holding decimal integers -> their sum and difference as strings."""
    io = [
        helper.make_tensor_value_info(n, TensorProto.STRING, ["batch", 16])
        for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")
    ]
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
        helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
        helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
        helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING),
    ]
    graph = helper.make_graph(nodes, "simple_string", io[:2], io[2:])
    save(
        helper.make_model(graph, opset_imports=OPSET, producer_name="kernelport-demo"),
        "simple_string",
        "# BYTES tensors holding decimal integers; outputs are their sum and difference\n"
        "backend: onnxruntime\nmax_batch_size: 8\n",
    )


def mlp(width: int = 64, layers: int = 3, seed: int = 0) -> None:
    """FP32 MLP: INPUT0 [-1,width] -> `layers` x (Gemm + Relu, none after the last)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    current = "INPUT0"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        bias = (rng.standard_normal(width) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "OUTPUT0" if i == layers - 1 else f"h{i}"
        gemm_out = out if i == layers - 1 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [gemm_out]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    save(
        helper.make_model(graph, opset_imports=OPSET, producer_name="kernelport-demo"),
        "mlp",
        f"# FP32 MLP {width}->{width} x{layers}; inputs/outputs are derived from the ONNX file\n"
        "backend: onnxruntime\nmax_batch_size: 64\n"
        "parameters:\n  intra_op_threads: 1\n  inter_op_threads: 1\n",
    )


def torch_mlp(width: int = 16, hidden: int = 32, classes: int = 4, seed: int = 0) -> None:
    """FP32 MLP as a torch.export program: features [-1,width] -> {"logits": [-1,classes]}.

    Its model.yaml names no inputs or outputs: the server reads them from the program.
    """
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(width, hidden)
            self.out = torch.nn.Linear(hidden, classes)

        def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.out(torch.relu(self.hidden(features)))}

    torch.manual_seed(seed)
    model = Mlp().eval()
    batch = torch.export.Dim("batch", max=1024)
    program = torch.export.export(
        model, (torch.zeros(2, width),), dynamic_shapes={"features": {0: batch}}
    )
    version = ROOT / "torch_mlp" / "1"
    version.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, version / "model.pt2")
    (ROOT / "torch_mlp" / "model.yaml").write_text(
        f"# FP32 MLP {width}->{hidden}->{classes} exported with torch.export; inputs and outputs\n"
        "# (features -> logits) are read from the program's signature\n"
        "backend: torch\nmax_batch_size: 16\n"
    )


PYTHON_MODEL = '''"""Demo Python model: softmax over logits, and the most likely class."""

import numpy as np


class Model:
    def load(self, config):
        self.temperature = float(config.parameters.get("temperature", 1.0))

    def execute(self, inputs):
        # Called with the whole batch: LOGITS is [rows, classes].
        logits = inputs["LOGITS"].astype(np.float64) / self.temperature
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        return {
            "PROBABILITIES": probs.astype(np.float32),
            "CLASS": probs.argmax(axis=1).astype(np.int64)[:, None],
        }
'''


def python_softmax(classes: int = 4) -> None:
    """A Python-backend model (model.py): FP32 LOGITS [-1,classes] -> PROBABILITIES, CLASS."""
    version = ROOT / "python_softmax" / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(PYTHON_MODEL)
    (ROOT / "python_softmax" / "model.yaml").write_text(
        "# Python backend: 1/model.py holds the model class; feed it torch_mlp's logits\n"
        "backend: python\nmax_batch_size: 16\n"
        f"inputs:\n  - {{name: LOGITS, datatype: FP32, dims: [{classes}]}}\n"
        f"outputs:\n  - {{name: PROBABILITIES, datatype: FP32, dims: [{classes}]}}\n"
        "  - {name: CLASS, datatype: INT64, dims: [1]}\n"
        "parameters:\n  temperature: 1.0\n"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        ROOT = Path(sys.argv[1])
    simple()
    simple_string()
    mlp()
    torch_mlp()
    python_softmax()
    print(f"wrote demo models to {ROOT}")
