"""The small kernelport.v1.InferenceService/Infer API against the demo server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import RunningServer

from kernelport.schema import pb

V1 = pb.kernelport_v1


def _call(server: RunningServer, request: object) -> object:
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary(
            "/kernelport.v1.InferenceService/Infer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=V1.InferResponse.FromString,
        )
        return infer(request)


def test_infer_round_trip(demo_server: RunningServer) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    request = V1.InferRequest(model="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, dtype=V1.DType.Value("I32"), shape=[2, 16], data=a.tobytes())
    response = _call(demo_server, request)
    outputs = {t.name: t for t in response.outputs}  # type: ignore[attr-defined]
    assert V1.DType.Name(outputs["OUTPUT0"].dtype) == "I32"
    got = np.frombuffer(outputs["OUTPUT0"].data, np.int32).reshape(tuple(outputs["OUTPUT0"].shape))
    np.testing.assert_array_equal(got, a + a)
    assert response.backend_us >= 0  # type: ignore[attr-defined]


def test_errors_are_status_codes(demo_server: RunningServer) -> None:
    request = V1.InferRequest(model="nope")
    with pytest.raises(grpc.RpcError) as info:
        _call(demo_server, request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    request = V1.InferRequest(model="simple")
    request.inputs.add(name="INPUT0", dtype=0, shape=[1, 16], data=b"\0" * 64)
    with pytest.raises(grpc.RpcError) as info:
        _call(demo_server, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DTYPE_UNSPECIFIED" in info.value.details()
