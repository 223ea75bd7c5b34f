"""Triton config.pbtxt / JSON -> ModelConfig: translated, warned about, or rejected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernelport.core.model_config import parse_model_config, triton_config
from kernelport.core.reshape import ReshapedInstance, framework_config
from kernelport.errors import ErrorCode, ServerError
from kernelport.pbtxt import TritonConfigReader

TENSORS = """
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_STRING dims: [ -1 ] } ]
"""


def _read(tmp_path: Path, text: str) -> tuple[dict[str, object], tuple[str, ...]]:
    path = tmp_path / "m" / "config.pbtxt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    document = TritonConfigReader().read_pbtxt(path)
    return document.raw, document.warnings


def test_supported_fields_translate(tmp_path: Path) -> None:
    raw, warnings = _read(tmp_path, TENSORS + """
        name: "m"
        platform: "onnxruntime_onnx"
        max_batch_size: 16
        version_policy: { specific { versions: [ 1, 3 ] } }
        dynamic_batching {
          preferred_batch_size: [ 4, 8 ]
          max_queue_delay_microseconds: 250
          preserve_ordering: true
          priority_levels: 2
          default_priority_level: 2
          default_queue_policy { max_queue_size: 32 default_timeout_microseconds: 9000
                                 allow_timeout_override: true }
        }
        instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] }, { kind: KIND_CPU } ]
        default_model_filename: "net.onnx"
        parameters { key: "intra_op_threads" value: { string_value: "2" } }
        model_transaction_policy { decoupled: false }
        optimization { }
    """)  # fmt: skip
    assert warnings == ()
    config = parse_model_config(raw, "m/config.pbtxt")
    assert (config.name, config.backend, config.platform) == (
        "m",
        "onnxruntime_onnx",
        "onnxruntime_onnx",
    )
    assert config.max_batch_size == 16
    assert config.inputs[0].datatype == "FP32" and config.outputs[0].datatype == "BYTES"
    assert config.version_policy.specific == (1, 3)
    batching = config.dynamic_batching
    assert batching is not None
    assert batching.preferred_batch_sizes == (4, 8) and batching.max_queue_delay_us == 250
    assert batching.preserve_ordering and batching.priority_levels == 2
    assert (batching.max_queue_size, batching.default_timeout_us) == (32, 9000)
    groups = [(g.count, g.device) for g in config.instance_group]
    assert groups == [(2, "cuda:0"), (2, "cuda:1"), (1, "cpu")]
    assert config.default_model_filename == "net.onnx"
    assert config.parameters == {"intra_op_threads": "2"}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("sequence_batching { state [ { input_name: \"S\" output_name: \"T\" } ] }",
         "sequence_batching.state[0]: a state needs its data_type and dims"),
        ("sequence_batching { control_input [ { name: \"S\" control [ { } ] } ] }",
         "sequence_batching.control_input[0].control[0]: expected int32_false_true"),
        ('platform: "ensemble"', "ensemble_scheduling: an ensemble needs its steps"),
        ("ensemble_scheduling { step [ { model_name: \"a\" } ] }",
         'ensemble_scheduling: only an ensemble (platform: "ensemble") has steps'),
        ('batch_input [ { target_name: "B" } ]', "batch_input: "),
        ('model_operations { op_library_filename: "ops.so" }', "model_operations: "),
        ('input [ { name: "S" data_type: TYPE_INT64 dims: [1] is_shape_tensor: true } ]',
         "input[1].is_shape_tensor: shape tensors are not supported"),
        ('input [ { name: "R" data_type: TYPE_FP32 dims: [-1] allow_ragged_batch: true } ]',
         "input[1].allow_ragged_batch: ragged batching is not supported"),
        ('input [ { name: "Z" dims: [1] } ]', "input[1].data_type: expected a data type"),
        ('input [ { name: "Z" data_type: TYPE_FP32 dims: [0] } ]', "input[1].dims: [0]: expected"),
        ("max_batch_size: -1", "max_batch_size: -1: expected 0 or more"),
        ("instance_group [ { count: -2 } ]", "instance_group[0].count: -2: expected 1 or more"),
        ("max_batch_size: 4\nfoo: 1", 'line 5, column 1: Message type "inference.ModelConfig" '
         'has no field named "foo"'),
        ("max_batch_size: four", "line 4, column 17: 'max_batch_size: four': Couldn't parse"),
    ],
)  # fmt: skip
def test_rejected_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ServerError) as info:
        _read(tmp_path, TENSORS + text)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message.startswith(f"{tmp_path / 'm' / 'config.pbtxt'}: ")
    assert field in info.value.message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('backend: "pytorch"\noptimization { graph { level: 1 } }',
         "optimization.graph: not supported"),
        ("optimization { cuda { graphs: true } }", "optimization.cuda: not supported"),
        ("response_cache { enable: true }", "response_cache: not supported"),
        ('metric_tags { key: "a" value: "b" }', "metric_tags: not supported"),
        ('cc_model_filenames { key: "8.0" value: "m.plan" }', "cc_model_filenames: "),
        ('runtime: "model.py"', "runtime: not supported"),
        ('output [ { name: "L" data_type: TYPE_FP32 dims: [1] label_filename: "l.txt" } ]',
         "output[1].label_filename: classification labels"),
        ('input [ { name: "I" data_type: TYPE_FP32 dims: [3] format: FORMAT_NCHW } ]',
         "input[1].format: informational only"),
        ("instance_group [ { kind: KIND_GPU } ]", "instance_group[0].gpus: not listed"),
        ("instance_group [ { kind: KIND_MODEL } ]", "instance_group[0].kind: KIND_MODEL"),
        ("instance_group [ { rate_limiter { priority: 2 } } ]",
         "instance_group[0].rate_limiter: not supported by KernelPort; ignored"),
        ("max_batch_size: 4\ndynamic_batching { priority_queue_policy { key: 1 value: { } } }",
         "dynamic_batching.priority_queue_policy: per-priority queue policies"),
        ("max_batch_size: 4\ndynamic_batching { default_queue_policy { timeout_action: DELAY } }",
         "dynamic_batching.default_queue_policy.timeout_action: DELAY is not supported"),
        ("dynamic_batching { }", "dynamic_batching: ignored: the model does not batch"),
    ],
)  # fmt: skip
def test_warned_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    raw, warnings = _read(tmp_path, TENSORS + text)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{tmp_path / 'm' / 'config.pbtxt'}: {field}")
    parse_model_config({"name": "m", "backend": "x"} | raw, "m")  # still valid: the model loads


def test_triton_json_round_trips_what_the_server_reports(tmp_path: Path) -> None:
    raw, _ = _read(tmp_path, TENSORS + """
        backend: "onnxruntime"
        max_batch_size: 8
        version_policy: { latest { num_versions: 2 } }
        dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 100 }
        instance_group [ { count: 3 kind: KIND_CPU } ]
        parameters { key: "k" value: { string_value: "v" } }
    """)  # fmt: skip
    config = parse_model_config({"name": "m", **raw}, "config.pbtxt")
    # What GET .../config returns can be edited and sent back as a load's config override.
    document = TritonConfigReader().read_triton_json(triton_config(config), "override")
    assert document is not None and document.warnings == ()
    assert parse_model_config(document.raw, "override") == config


def test_model_yaml_shaped_json_is_left_to_core() -> None:
    reader = TritonConfigReader()
    kernelport_form = {"backend": "identity", "inputs": [], "parameters": {"delay_ms": 1}}
    assert reader.read_triton_json(kernelport_form, "override") is None
    with pytest.raises(ServerError, match="override: Failed to parse input field"):
        reader.read_triton_json({"input": [{"datatype": "FP32"}]}, "override")


def test_reshape_is_a_view_between_api_and_framework() -> None:
    config = parse_model_config({
        "name": "m", "backend": "x", "max_batch_size": 4,
        "inputs": [{"name": "X", "datatype": "FP32", "dims": [4], "reshape": [2, 2]}],
        "outputs": [{"name": "Y", "datatype": "FP32", "dims": [1], "reshape": []}],
    }, "m")  # fmt: skip
    seen = framework_config(config)
    assert seen.inputs[0].dims == (2, 2) and seen.outputs[0].dims == ()

    class Inner:
        def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            assert inputs["X"].shape == (3, 2, 2)
            return {"Y": inputs["X"].sum(axis=(1, 2))}

        def unload(self) -> None:
            pass

    out = ReshapedInstance(Inner(), config).execute({"X": np.ones((3, 4), np.float32)})
    assert out["Y"].shape == (3, 1) and out["Y"][0, 0] == 4.0
    with pytest.raises(ServerError, match="reshape \\[3\\] has 3 elements, dims \\[4\\] have 4"):
        parse_model_config({
            "name": "m", "backend": "x",
            "inputs": [{"name": "X", "datatype": "FP32", "dims": [4], "reshape": [3]}],
        }, "m")  # fmt: skip


def test_warmup_samples_translate_and_render_back(tmp_path: Path) -> None:
    raw, warnings = _read(tmp_path, TENSORS + """
        platform: "onnxruntime_onnx"
        max_batch_size: 4
        model_warmup [
          { name: "zeros" batch_size: 2 count: 3
            inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } },
          { inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 4 ]
                                       input_data_file: "x.bin" } } }
        ]
    """)  # fmt: skip
    assert warnings == ()
    config = parse_model_config({**raw, "name": "m"}, "m")
    first, second = config.model_warmup
    assert (first.name, first.batch_size, first.count) == ("zeros", 2, 3)
    assert first.inputs["X"].zero_data and first.inputs["X"].datatype == "FP32"
    # Triton's defaults: a nameless sample gets a name; batch_size and count 0 mean 1
    assert (second.name, second.batch_size, second.count) == ("warmup_1", 1, 1)
    assert second.inputs["X"].input_data_file == "x.bin"
    rendered = triton_config(config)["model_warmup"]
    assert rendered[0]["inputs"]["X"] == {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True}
    assert rendered[1]["inputs"]["X"]["input_data_file"] == "x.bin"


def test_a_warmup_input_without_data_is_rejected(tmp_path: Path) -> None:
    text = 'model_warmup [ { inputs { key: "X" value: { data_type: TYPE_FP32 } } } ]'
    with pytest.raises(ServerError, match=r"model_warmup\[0\]\.inputs\[X\]: expected zero_data"):
        _read(tmp_path, TENSORS + text)
