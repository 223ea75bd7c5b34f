"""Sample messages of every kind the protocol has, built the same way from either protobuf
namespace (kernelport's ``pb.inference`` or tritonclient's generated modules), for the wire
round-trip tests in ``test_grpc_protos.py``. Each sets as many fields as the message has."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message


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
