"""Protobuf message classes for kernelport's schemas: the gRPC APIs and Triton's model config.

The classes come from ``protos/descriptors.binpb`` (regenerate it with
``scripts/gen_protos.sh``) loaded into a *private* descriptor pool.
``tritonclient.grpc`` registers the very same ``inference.*`` symbols in
protobuf's default pool, and a second registration there fails with
"duplicate symbol"; a private pool lets both live in one process while staying
wire-compatible, since the wire format depends only on field numbers.

It is its own area, apart from the gRPC front end, because reading ``config.pbtxt`` needs
the same messages and must not depend on a front end; the gRPC wiring lives in
``kernelport.protocols.grpc.rpc``. Usage::

    from kernelport.schema import pb

    req = pb.inference.ModelInferRequest(model_name="demo")
    config = pb.inference.ModelConfig(name="demo")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any, NoReturn

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

__all__ = [
    "INFERENCE_SERVICE",
    "KERNELPORT_SERVICE",
    "POOL",
    "ProtoNamespace",
    "inference",
    "kernelport_v1",
]

INFERENCE_SERVICE = "inference.GRPCInferenceService"
"""Full name of the KServe V2 / Triton-compatible service."""

KERNELPORT_SERVICE = "kernelport.v1.InferenceService"
"""Full name of kernelport's own minimal service."""


class ProtoNamespace:
    """Read-only attribute access to the top-level messages and enums of proto files.

    Messages are protobuf message classes; enums are ``EnumTypeWrapper``
    objects (``DataType.Value("TYPE_FP32")``, ``DataType.TYPE_FP32``), exactly
    what generated ``*_pb2`` modules expose under the same names.
    """

    __slots__ = ("_members", "_package")

    def __init__(self, package: str, members: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_package", package)
        object.__setattr__(self, "_members", dict(members))

    def __getattr__(self, name: str) -> Any:
        # Typed as Any: the classes are created at runtime, so no static type
        # is more precise than Message, which would reject keyword construction.
        try:
            return self._members[name]
        except KeyError:
            raise AttributeError(
                f"proto package {self._package!r} has no message or enum {name!r}"
            ) from None

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __dir__(self) -> list[str]:
        return sorted(self._members)

    def __repr__(self) -> str:
        return f"<ProtoNamespace {self._package} ({len(self._members)} names)>"


def _load_pool() -> descriptor_pool.DescriptorPool:
    data = resources.files(__package__).joinpath("protos/descriptors.binpb").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    # --include_imports emits dependencies before dependants, so adding in
    # order always finds imported files already present.
    for file_proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(file_proto)
    return pool


def _namespace(
    pool: descriptor_pool.DescriptorPool, package: str, files: Iterable[str]
) -> ProtoNamespace:
    members: dict[str, Any] = {}
    for file_name in files:
        file_desc = pool.FindFileByName(file_name)
        for name, msg_desc in file_desc.message_types_by_name.items():
            members[name] = message_factory.GetMessageClass(msg_desc)
        for name, enum_desc in file_desc.enum_types_by_name.items():
            members[name] = EnumTypeWrapper(enum_desc)
    return ProtoNamespace(package, members)


POOL: descriptor_pool.DescriptorPool = _load_pool()
"""The private pool holding every kernelport descriptor (e.g. for gRPC reflection)."""

inference: ProtoNamespace = _namespace(
    POOL, "inference", ("grpc_service.proto", "model_config.proto")
)
"""Messages and enums of package ``inference`` (grpc_service.proto and model_config.proto)."""

kernelport_v1: ProtoNamespace = _namespace(POOL, "kernelport.v1", ("kernelport_v1.proto",))
"""Messages and enums of package ``kernelport.v1``."""
