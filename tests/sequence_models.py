"""Sequence models with implicit state (Triton's ``sequence_batching { state [...] }``), shared
by the in-process and e2e tests: the server keeps each sequence's running sum."""

from __future__ import annotations

# The state comes back as ACC_OUT and is fed as ACC_IN on the sequence's next request; the
# config leaves out input/output, so they come from the ONNX file, state tensors hidden.
STATE_ACCUMULATOR_PBTXT = """
backend: "onnxruntime"
max_batch_size: 8
instance_group [ { count: 2 kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 60000000
  state [
    {
      input_name: "ACC_IN"
      output_name: "ACC_OUT"
      data_type: TYPE_FP32
      dims: [ 1 ]
      initial_state: { data_type: TYPE_FP32 dims: [ 1 ] zero_data: true name: "zeros" }
    }
  ]
}
"""


def onnx_accumulator() -> bytes:
    """OUTPUT = ACC_OUT = INPUT + ACC_IN (FP32 [batch, 1])."""
    from onnx import TensorProto, helper

    def value(name: str) -> object:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [-1, 1])

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT", "ACC_IN"], ["SUM"]),
            helper.make_node("Identity", ["SUM"], ["OUTPUT"]),
            helper.make_node("Identity", ["SUM"], ["ACC_OUT"]),
        ],
        "accumulator",
        [value("INPUT"), value("ACC_IN")],
        [value("OUTPUT"), value("ACC_OUT")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def sequence_values(corrid: int) -> list[float]:
    """A sequence's inputs: 3 to 6 values, different per correlation id."""
    return [float((corrid * 7 + i * 3) % 11) for i in range(3 + corrid % 4)]
