"""kernelport's private-pool protobuf classes vs. tritonclient's generated ones.

tritonclient's ``service_pb2`` / ``model_config_pb2`` are Triton's own
generated code, so they are the reference for what "wire compatible" means.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FileDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_svc

from kernelport.schema import pb

SRC = Path(__file__).resolve().parents[2] / "src"


class _TritonNamespace:
    """tritonclient's two generated modules behind the same attribute API as ``pb.inference``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(triton_svc, name, None) or getattr(triton_mc, name)


TRITON = _TritonNamespace()


# --------------------------------------------------------------------------- imports


_CHECK_POOLS = """
from google.protobuf import descriptor_pool
default = descriptor_pool.Default()
assert pb.POOL is not default
try:
    default.FindMessageTypeByName("kernelport.v1.InferRequest")
except KeyError:
    pass
else:
    raise AssertionError("kernelport descriptors leaked into the default pool")
theirs = tritonclient.grpc.service_pb2.ModelInferRequest
assert pb.inference.ModelInferRequest.DESCRIPTOR is not theirs.DESCRIPTOR
print("ok")
"""

_IMPORT_ORDERS = {
    "tritonclient_first": "import tritonclient.grpc\nfrom kernelport.schema import pb\n",
    "kernelport_first": "from kernelport.schema import pb\nimport tritonclient.grpc\n",
}


@pytest.mark.parametrize("order", sorted(_IMPORT_ORDERS))
def test_import_alongside_tritonclient(order: str) -> None:
    # A fresh interpreter: in this one both modules are already imported.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ORDERS[order] + _CHECK_POOLS],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# --------------------------------------------------------------------------- schema


def _file_shape(file_desc: FileDescriptor) -> dict[str, object]:
    """Everything about a file's types that matters on the wire or in JSON, keyed by full name."""
    proto = descriptor_pb2.FileDescriptorProto()
    file_desc.CopyToProto(proto)
    shape: dict[str, object] = {
        "package": proto.package,
        "syntax": proto.syntax,
        "deps": list(proto.dependency),
    }

    def walk(prefix: str, messages: Any, enums: Any) -> None:
        for enum in enums:
            shape[prefix + enum.name] = sorted((v.name, v.number) for v in enum.value)
        for msg in messages:
            name = prefix + msg.name
            oneofs = [o.name for o in msg.oneof_decl]
            shape[name] = (
                msg.options.map_entry,
                sorted(
                    (
                        f.number,
                        f.name,
                        f.type,
                        f.label,
                        f.type_name,
                        oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
                    )
                    for f in msg.field
                ),
            )
            walk(name + ".", msg.nested_type, msg.enum_type)

    walk("", proto.message_type, proto.enum_type)
    for service in proto.service:
        shape[service.name] = sorted(
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in service.method
        )
    return shape


@pytest.mark.parametrize(
    ("file_name", "triton_file"),
    [("grpc_service.proto", triton_svc.DESCRIPTOR), ("model_config.proto", triton_mc.DESCRIPTOR)],
)
def test_schema_matches_tritonclient(file_name: str, triton_file: FileDescriptor) -> None:
    ours = _file_shape(pb.POOL.FindFileByName(file_name))
    theirs = _file_shape(triton_file)
    differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    assert not differing, {
        k: {"ours": ours.get(k), "tritonclient": theirs.get(k)} for k in differing
    }


def test_service_has_all_rpcs_with_stream_infer_bidirectional() -> None:
    service = pb.POOL.FindServiceByName(pb.INFERENCE_SERVICE)
    assert len(service.methods) == 20
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert not any(
        m.client_streaming or m.server_streaming for m in service.methods if m is not stream
    )


def test_kernelport_v1_dtype_numbers() -> None:
    dtype = pb.kernelport_v1.DType
    expected = [
        "DTYPE_UNSPECIFIED",
        "F32",
        "F16",
        "I64",
        "I32",
        "U8",
        "BF16",
        "F64",
        "I8",
        "I16",
        "U16",
        "U32",
        "U64",
        "BOOL",
        "BYTES",
    ]
    assert [dtype.Name(i) for i in range(len(expected))] == expected
    tensor = pb.kernelport_v1.Tensor(name="x", dtype=dtype.F32, shape=[1, 2], data=b"\0" * 8)
    reply = pb.kernelport_v1.InferResponse(
        outputs=[tensor], queued_us=1, batched_us=2, backend_us=3
    )
    assert pb.kernelport_v1.InferResponse.FromString(reply.SerializeToString()) == reply


# --------------------------------------------------------------------------- wire round trips


def _param(ns: Any, kind: str, value: object) -> Message:
    return ns.InferParameter(**{kind: value})


def _all_contents(ns: Any) -> Message:
    return ns.InferTensorContents(
        bool_contents=[True, False],
        int_contents=[-1, 2],
        int64_contents=[-(2**40)],
        uint_contents=[7],
        uint64_contents=[2**63],
        fp32_contents=[1.5],
        fp64_contents=[-2.25],
        bytes_contents=[b"a", b""],
    )


def _every_param_kind(ns: Any) -> dict[str, Message]:
    return {
        "b": _param(ns, "bool_param", True),
        "i": _param(ns, "int64_param", -5),
        "s": _param(ns, "string_param", "x"),
        "d": _param(ns, "double_param", 0.5),
        "u": _param(ns, "uint64_param", 2**64 - 1),
    }


def model_infer_request(ns: Any) -> Message:
    return ns.ModelInferRequest(
        model_name="m",
        model_version="3",
        id="req-1",
        parameters=_every_param_kind(ns),
        inputs=[
            ns.ModelInferRequest.InferInputTensor(
                name="IN0",
                datatype="FP32",
                shape=[2, -1],
                parameters={"p": _param(ns, "int64_param", 1)},
                contents=_all_contents(ns),
            ),
        ],
        outputs=[
            ns.ModelInferRequest.InferRequestedOutputTensor(
                name="OUT0", parameters={"c": _param(ns, "int64_param", 3)}
            )
        ],
        raw_input_contents=[b"\x00\x01", b""],
    )


def model_infer_response(ns: Any) -> Message:
    return ns.ModelInferResponse(
        model_name="m",
        model_version="1",
        id="req-1",
        parameters=_every_param_kind(ns),
        outputs=[
            ns.ModelInferResponse.InferOutputTensor(
                name="OUT0",
                datatype="INT64",
                shape=[1, 4],
                parameters={"p": _param(ns, "bool_param", True)},
                contents=_all_contents(ns),
            ),
        ],
        raw_output_contents=[b"\xff" * 32, b""],
    )


def model_stream_infer_response(ns: Any) -> Message:
    return ns.ModelStreamInferResponse(
        error_message="boom", infer_response=model_infer_response(ns)
    )


def _model_config(ns: Any) -> Message:
    return ns.ModelConfig(
        name="resnet",
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        runtime="rt.so",
        max_batch_size=8,
        version_policy=ns.ModelVersionPolicy(latest=ns.ModelVersionPolicy.Latest(num_versions=2)),
        input=[
            ns.ModelInput(
                name="x",
                data_type=ns.DataType.Value("TYPE_FP32"),
                format=ns.ModelInput.FORMAT_NCHW,
                dims=[3, -1, 224],
                reshape=ns.ModelTensorReshape(shape=[1, 3]),
                optional=True,
                allow_ragged_batch=True,
                is_shape_tensor=False,
                is_non_linear_format_io=True,
            )
        ],
        output=[
            ns.ModelOutput(
                name="y",
                data_type=ns.DataType.Value("TYPE_BF16"),
                dims=[1000],
                label_filename="labels.txt",
                is_shape_tensor=True,
            )
        ],
        batch_input=[
            ns.BatchInput(
                kind=ns.BatchInput.BATCH_ITEM_SHAPE,
                target_name=["t"],
                source_input=["x"],
                data_type=ns.DataType.Value("TYPE_INT32"),
            )
        ],
        batch_output=[
            ns.BatchOutput(target_name=["y"], kind=ns.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE)
        ],
        instance_group=[
            ns.ModelInstanceGroup(
                name="g0",
                kind=ns.ModelInstanceGroup.KIND_GPU,
                count=2,
                gpus=[0, 1],
                profile=["p"],
                passive=True,
                host_policy="numa0",
                # "global" is a Python keyword, hence the dict.
                rate_limiter=ns.ModelRateLimiter(
                    priority=1,
                    resources=[ns.ModelRateLimiter.Resource(name="r", count=4, **{"global": True})],
                ),
                secondary_devices=[ns.ModelInstanceGroup.SecondaryDevice(device_id=3)],
            ),
            ns.ModelInstanceGroup(kind=ns.ModelInstanceGroup.KIND_CPU, count=1),
        ],
        dynamic_batching=ns.ModelDynamicBatching(
            preferred_batch_size=[4, 8],
            max_queue_delay_microseconds=100,
            preserve_ordering=True,
            priority_levels=2,
            default_priority_level=1,
            default_queue_policy=ns.ModelQueuePolicy(
                timeout_action=ns.ModelQueuePolicy.DELAY, max_queue_size=16
            ),
            priority_queue_policy={
                2: ns.ModelQueuePolicy(default_timeout_microseconds=5, allow_timeout_override=True)
            },
        ),
        optimization=ns.ModelOptimizationPolicy(
            priority=ns.ModelOptimizationPolicy.PRIORITY_MAX,
            graph=ns.ModelOptimizationPolicy.Graph(level=1),
            cuda=ns.ModelOptimizationPolicy.Cuda(
                graphs=True,
                graph_spec=[
                    ns.ModelOptimizationPolicy.Cuda.GraphSpec(
                        batch_size=4,
                        input={"x": ns.ModelOptimizationPolicy.Cuda.GraphSpec.Shape(dim=[3, 224])},
                    )
                ],
            ),
            input_pinned_memory=ns.ModelOptimizationPolicy.PinnedMemoryBuffer(enable=True),
            gather_kernel_buffer_threshold=3,
            eager_batching=True,
        ),
        default_model_filename="model.onnx",
        cc_model_filenames={"8.6": "a.plan"},
        metric_tags={"k": "v"},
        parameters={"EXECUTION_ENV_PATH": ns.ModelParameter(string_value="/env")},
        model_warmup=[
            ns.ModelWarmup(
                name="w",
                batch_size=1,
                count=2,
                inputs={
                    "x": ns.ModelWarmup.Input(
                        data_type=ns.DataType.Value("TYPE_FP32"), dims=[3], random_data=True
                    )
                },
            )
        ],
        model_operations=ns.ModelOperations(op_library_filename=["libop.so"]),
        model_transaction_policy=ns.ModelTransactionPolicy(decoupled=True),
        model_repository_agents=ns.ModelRepositoryAgents(
            agents=[ns.ModelRepositoryAgents.Agent(name="checksum", parameters={"a": "b"})]
        ),
        response_cache=ns.ModelResponseCache(enable=True),
        model_metrics=ns.ModelMetrics(
            metric_control=[
                ns.ModelMetrics.MetricControl(
                    metric_identifier=ns.ModelMetrics.MetricControl.MetricIdentifier(family="f"),
                    histogram_options=ns.ModelMetrics.MetricControl.HistogramOptions(
                        buckets=[0.1, 1.0]
                    ),
                )
            ]
        ),
    )


def model_config_response(ns: Any) -> Message:
    return ns.ModelConfigResponse(config=_model_config(ns))


def sequence_model_config(ns: Any) -> Message:
    seq = ns.ModelSequenceBatching
    return ns.ModelConfig(
        name="seq",
        max_batch_size=4,
        sequence_batching=seq(
            max_sequence_idle_microseconds=10,
            iterative_sequence=True,
            oldest=seq.StrategyOldest(
                max_candidate_sequences=3, preferred_batch_size=[2], preserve_ordering=True
            ),
            control_input=[
                seq.ControlInput(
                    name="START",
                    control=[
                        seq.Control(
                            kind=seq.Control.CONTROL_SEQUENCE_START,
                            int32_false_true=[0, 1],
                            fp32_false_true=[0.0, 1.0],
                            bool_false_true=[False, True],
                            data_type=ns.DataType.Value("TYPE_INT32"),
                        )
                    ],
                )
            ],
            state=[
                seq.State(
                    input_name="s_in",
                    output_name="s_out",
                    dims=[-1],
                    use_growable_memory=True,
                    initial_state=[seq.InitialState(name="init", dims=[1], data_file="f.bin")],
                )
            ],
        ),
    )


def ensemble_model_config(ns: Any) -> Message:
    step = ns.ModelEnsembling.Step(
        model_name="pre",
        model_version=-1,
        input_map={"a": "b"},
        output_map={"c": "d"},
        model_namespace="ns",
    )
    return ns.ModelConfig(
        name="ens",
        platform="ensemble",
        ensemble_scheduling=ns.ModelEnsembling(step=[step], max_inflight_requests=4),
    )


def model_statistics_response(ns: Any) -> Message:
    def dur(n: int) -> Message:
        return ns.StatisticDuration(count=n, ns=n * 1000)

    stats = ns.ModelStatistics(
        name="m",
        version="1",
        last_inference=1_700_000_000_000,
        inference_count=10,
        execution_count=5,
        inference_stats=ns.InferStatistics(
            success=dur(1),
            fail=dur(2),
            queue=dur(3),
            compute_input=dur(4),
            compute_infer=dur(5),
            compute_output=dur(6),
            cache_hit=dur(7),
            cache_miss=dur(8),
        ),
        batch_stats=[
            ns.InferBatchStatistics(
                batch_size=4, compute_input=dur(1), compute_infer=dur(2), compute_output=dur(3)
            )
        ],
        memory_usage=[ns.MemoryUsage(type="GPU", id=0, byte_size=1 << 20)],
        response_stats={
            "0": ns.InferResponseStatistics(
                compute_infer=dur(1),
                compute_output=dur(2),
                success=dur(3),
                fail=dur(4),
                empty_response=dur(5),
                cancel=dur(6),
            )
        },
    )
    return ns.ModelStatisticsResponse(model_stats=[stats, ns.ModelStatistics(name="other")])


def repository_index_response(ns: Any) -> Message:
    index = ns.RepositoryIndexResponse.ModelIndex
    return ns.RepositoryIndexResponse(
        models=[
            index(name="a", version="1", state="READY", reason=""),
            index(name="b", state="UNAVAILABLE", reason="failed to load"),
            index(name="c"),
        ]
    )


def model_metadata_response(ns: Any) -> Message:
    meta = ns.ModelMetadataResponse.TensorMetadata
    return ns.ModelMetadataResponse(
        name="m",
        versions=["1", "2"],
        platform="pytorch_libtorch",
        inputs=[meta(name="x", datatype="FP16", shape=[-1, 3])],
        outputs=[meta(name="y", datatype="BYTES", shape=[1])],
    )


def server_metadata_response(ns: Any) -> Message:
    return ns.ServerMetadataResponse(
        name="kernelport", version="0.1", extensions=["statistics", "sequence"]
    )


def misc_requests(ns: Any) -> list[Message]:
    return [
        ns.RepositoryModelLoadRequest(
            repository_name="r",
            model_name="m",
            parameters={
                "config": ns.ModelRepositoryParameter(string_param="{}"),
                "file:1/model.onnx": ns.ModelRepositoryParameter(bytes_param=b"\x08\x01"),
            },
        ),
        ns.SystemSharedMemoryStatusResponse(
            regions={
                "r": ns.SystemSharedMemoryStatusResponse.RegionStatus(
                    name="r", key="/k", offset=8, byte_size=64
                )
            }
        ),
        ns.CudaSharedMemoryRegisterRequest(
            name="c", raw_handle=b"\x01" * 64, device_id=1, byte_size=128
        ),
        ns.CudaSharedMemoryStatusResponse(
            regions={
                "c": ns.CudaSharedMemoryStatusResponse.RegionStatus(
                    name="c", device_id=1, byte_size=128
                )
            }
        ),
        ns.TraceSettingRequest(
            model_name="m",
            settings={"trace_level": ns.TraceSettingRequest.SettingValue(value=["TIMESTAMPS"])},
        ),
        ns.LogSettingsRequest(
            settings={"log_verbose_level": ns.LogSettingsRequest.SettingValue(uint32_param=1)}
        ),
    ]


def _as_dict(msg: Message) -> dict[str, Any]:
    # Default-valued fields are printed too, so a field one side lacks shows up as a diff.
    as_dict: dict[str, Any] = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return as_dict


BUILDERS: list[Callable[[Any], Message]] = [
    model_infer_request,
    model_infer_response,
    model_stream_infer_response,
    model_config_response,
    sequence_model_config,
    ensemble_model_config,
    model_statistics_response,
    repository_index_response,
    model_metadata_response,
    server_metadata_response,
]


def _cases() -> list[Any]:
    cases = [pytest.param(builder, id=builder.__name__) for builder in BUILDERS]
    for i, sample in enumerate(misc_requests(TRITON)):
        cases.append(pytest.param(lambda ns, i=i: misc_requests(ns)[i], id=type(sample).__name__))
    return cases


@pytest.mark.parametrize("build", _cases())
def test_wire_round_trip_both_directions(build: Callable[[Any], Message]) -> None:
    ours, theirs = build(pb.inference), build(TRITON)
    assert ours.DESCRIPTOR.full_name == theirs.DESCRIPTOR.full_name
    expected = _as_dict(theirs)
    assert expected and _as_dict(ours) == expected

    parsed_by_triton = type(theirs).FromString(ours.SerializeToString())
    assert _as_dict(parsed_by_triton) == expected
    parsed_by_us = type(ours).FromString(theirs.SerializeToString())
    assert _as_dict(parsed_by_us) == expected


def _fields_set(msg: Message, seen: set[str]) -> None:
    for field, value in msg.ListFields():
        seen.add(field.full_name)
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    _fields_set(item, seen)
        else:
            for item in value if field.is_repeated else [value]:
                _fields_set(item, seen)


def _fields_reachable(desc: Descriptor, seen: set[str]) -> None:
    for field in desc.fields:
        if field.full_name in seen:
            continue
        seen.add(field.full_name)
        target = field.message_type
        if target is not None and target.GetOptions().map_entry:
            target = target.fields_by_name["value"].message_type
        if target is not None:
            _fields_reachable(target, seen)


@pytest.mark.parametrize("build", [model_infer_request, model_infer_response])
def test_infer_messages_cover_every_field(build: Callable[[Any], Message]) -> None:
    # Guards the round-trip test: it only proves compatibility for fields it sets.
    msg = build(pb.inference)
    set_fields: set[str] = set()
    reachable: set[str] = set()
    _fields_set(msg, set_fields)
    _fields_reachable(msg.DESCRIPTOR, reachable)
    assert reachable - set_fields == set()
