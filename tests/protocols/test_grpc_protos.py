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
from proto_samples import (
    ensemble_model_config,
    misc_requests,
    model_config_response,
    model_infer_request,
    model_infer_response,
    model_metadata_response,
    model_statistics_response,
    model_stream_infer_response,
    repository_index_response,
    sequence_model_config,
    server_metadata_response,
)
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
