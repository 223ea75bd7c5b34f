"""Unit tests of the exact BF16/BYTES bridge to ONNX Runtime (backends/ort_values.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from kernelport.backends import ort_values


def test_string_maker_is_the_documented_graph() -> None:
    zero = helper.make_tensor("v", TensorProto.INT64, [1], [0])
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=zero),
            helper.make_node("Cast", ["zeros"], ["strings"], to=TensorProto.STRING),
        ],
        "strings",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("strings", TensorProto.STRING, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kernelport"
    )
    model.ir_version = 8
    assert model.SerializeToString() == ort_values._STRING_MAKER


def test_strings_round_trip_exactly() -> None:
    strings = ort_values.std_strings()
    assert strings is not None  # Linux + libstdc++: the exact path must be available
    rng = np.random.default_rng(3)
    items = [
        rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 40, 500)
    ]
    array = np.array([*items, b"", b"\x00", b"x\x00"], dtype=np.object_).reshape(-1, 1)
    value = strings.make(array)
    assert value.shape() == [len(array), 1]
    got = strings.read(value)
    assert got.shape == array.shape
    assert list(got.reshape(-1)) == list(array.reshape(-1))
    empty = strings.make(np.empty((0, 3), dtype=np.object_))
    assert strings.read(empty).shape == (0, 3)


def test_bf16_values_round_trip_bits() -> None:
    data = np.array([[1.5, -0.0], [np.inf, 3.0e38]], dtype=ml_dtypes.bfloat16)
    value = ort_values.to_ortvalue("x", data, "tensor(bfloat16)")
    assert isinstance(value, ort.OrtValue)
    assert value.data_type() == "tensor(bfloat16)"
    back = ort_values.from_ortvalue(value)
    assert back.dtype == data.dtype and back.shape == data.shape
    assert back.tobytes() == data.tobytes()
