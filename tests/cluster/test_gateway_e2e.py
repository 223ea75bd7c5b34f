"""The gateway in front of two real nodes: same answers as the nodes, each policy's placement
shown by the nodes' own statistics, clear errors for models nobody serves."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from gateway_nodes import (
    LPT_COSTS,
    count,
    get_json,
    infer_json,
    node_repository,
    post,
    running_gateway,
    status,
    wait_until,
)
from tritonclient.utils import InferenceServerException

from kernelport.cluster.placement import lpt_assign
from kernelport.schema import pb

PROTOCOLS = ["http", "grpc"]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningServer]]:
    root = tmp_path_factory.mktemp("nodes")
    repo = node_repository(root)
    with (
        running_server(root, repo, "--readiness", "any", wait_for="ready") as a,
        running_server(root, repo, "--readiness", "any", wait_for="ready") as b,
    ):
        yield {"a": a, "b": b}


@pytest.fixture(scope="module")
def gateway(
    nodes: dict[str, RunningServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_gateway(tmp_path_factory.mktemp("gw"), nodes) as gw:
        yield gw


def _client(protocol: str, server: RunningServer) -> object:
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def _infer(protocol: str, server: RunningServer, model: str, data: np.ndarray, **kw: object):  # type: ignore[no-untyped-def]
    module = httpclient if protocol == "http" else grpcclient
    tensor = module.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    outputs = [module.InferRequestedOutput("OUTPUT0")]
    client = _client(protocol, server)
    return client.infer(model, [tensor], outputs=outputs, **kw)  # type: ignore[attr-defined]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_answers_through_the_gateway_equal_direct_ones(
    protocol: str, nodes: dict[str, RunningServer], gateway: RunningServer
) -> None:
    data = np.arange(4, dtype=np.float32) * 1.5
    direct = _infer(protocol, nodes["a"], "ident", data)
    through = _infer(protocol, gateway, "ident", data)
    assert np.array_equal(through.as_numpy("OUTPUT0"), direct.as_numpy("OUTPUT0"))
    gw, node = _client(protocol, gateway), _client(protocol, nodes["a"])
    assert gw.get_model_metadata("ident") == node.get_model_metadata("ident")  # type: ignore[attr-defined]
    assert gw.get_model_config("ident") == node.get_model_config("ident")  # type: ignore[attr-defined]
    assert gw.is_model_ready("ident") and gw.is_server_ready() and gw.is_server_live()  # type: ignore[attr-defined]
    meta = gw.get_server_metadata()  # type: ignore[attr-defined]
    name = meta["name"] if protocol == "http" else meta.name
    assert name == "kernelport-gateway"


def test_compressed_bodies_and_binary_tensors_pass_through(
    nodes: dict[str, RunningServer], gateway: RunningServer
) -> None:
    data = np.linspace(-1, 1, 4, dtype=np.float32)
    result = _infer("http", gateway, "ident", data, request_compression_algorithm="gzip",
                    response_compression_algorithm="deflate")  # fmt: skip
    assert np.array_equal(result.as_numpy("OUTPUT0"), data)


def test_a_stream_is_served_through_the_gateway(gateway: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    results: queue.Queue[object] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error or result))
    for i in range(3):
        tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
        tensor.set_data_from_numpy(np.full(4, i, dtype=np.float32))
        client.async_stream_infer("ident", [tensor])
    answers = [results.get(timeout=10) for _ in range(3)]
    client.stop_stream()
    assert sorted(float(a.as_numpy("OUTPUT0")[0]) for a in answers) == [0.0, 1.0, 2.0]  # type: ignore[attr-defined]


def test_server_wide_routes_are_the_gateways_own(gateway: RunningServer) -> None:
    status_code, index = post(f"http://{gateway.http_url}/v2/repository/index", b"{}")
    by_name = {e["name"]: e.get("state") for e in index}
    assert status_code == 200 and by_name["ident"] == "READY" and by_name["broken"] != "READY"
    stats = get_json(f"http://{gateway.http_url}/v2/models/stats")
    assert len([s for s in stats["model_stats"] if s["name"] == "ident"]) == 1  # merged
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    names = {m.name for m in client.get_model_repository_index().models}
    assert {"ident", "broken", "m1"} <= names
    assert any(s.name == "ident" for s in client.get_inference_statistics().model_stats)
    # perf_analyzer unregisters shared memory before it starts: every node answers
    client.unregister_system_shared_memory()
    httpclient.InferenceServerClient(gateway.http_url).unregister_cuda_shared_memory()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_round_robin_alternates_between_the_nodes(
    protocol: str, nodes: dict[str, RunningServer], gateway: RunningServer
) -> None:
    served = []
    for i in range(6):
        before = {n: count(s, "ident") for n, s in nodes.items()}
        _infer(protocol, gateway, "ident", np.full(4, i, dtype=np.float32))
        after = {n: count(s, "ident") for n, s in nodes.items()}
        (node,) = (n for n in nodes if after[n] == before[n] + 1)
        served.append(node)
    assert served[0::2] == [served[0]] * 3 and served[1::2] == [served[1]] * 3
    assert {served[0], served[1]} == {"a", "b"}


def test_least_outstanding_sends_to_the_idle_node(
    nodes: dict[str, RunningServer], tmp_path: Path
) -> None:
    with running_gateway(tmp_path, nodes, "--policy", "least_outstanding") as gw:
        before = {n: count(s, "ident") for n, s in nodes.items()}
        slow = threading.Thread(target=infer_json, args=(gw.http_url, "slow", [1500.0], 30))
        slow.start()
        try:
            wait_until(lambda: sum(n["outstanding"] for n in status(gw)["nodes"]) == 1,
                       what="the slow request in flight")  # fmt: skip
            (busy,) = (n["name"] for n in status(gw)["nodes"] if n["outstanding"])
            for i in range(6):
                assert infer_json(gw.http_url, "ident", [float(i)] * 4)[0] == 200
            still_busy = {n["name"] for n in status(gw)["nodes"] if n["outstanding"]}
        finally:
            slow.join(30)
        assert still_busy == {busy}  # the slow one was in flight throughout
        idle = "b" if busy == "a" else "a"
        after = {n: count(s, "ident") for n, s in nodes.items()}
        assert after[idle] - before[idle] == 6 and after[busy] == before[busy]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_lpt_packing_places_models_where_lpt_says(
    protocol: str, nodes: dict[str, RunningServer], tmp_path: Path
) -> None:
    costs = [arg for m, c in LPT_COSTS.items() for arg in ("--model-cost", f"{m}={c:g}")]
    expected = lpt_assign(LPT_COSTS, ["a", "b"])
    # by hand: m1(7)->a, m2(5)->b, m3(4)->b (9), m4(3)->a (10), m5(1)->b (10)
    assert expected == {"m1": "a", "m2": "b", "m3": "b", "m4": "a", "m5": "b"}
    with running_gateway(tmp_path, nodes, "--policy", "lpt_packing", *costs) as gw:
        placement = status(gw)["placement"]
        assert {m: placement[m] for m in LPT_COSTS} == expected
        before = {(n, m): count(s, m) for n, s in nodes.items() for m in LPT_COSTS}
        for model in LPT_COSTS:
            for i in range(3):
                _infer(protocol, gw, model, np.full(4, i, dtype=np.float32))
        for (node, model), was in before.items():
            grew = count(nodes[node], model) - was
            assert grew == (3 if expected[model] == node else 0), (node, model)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_model_no_node_serves_is_not_found(protocol: str, gateway: RunningServer) -> None:
    with pytest.raises(InferenceServerException) as caught:
        _infer(protocol, gateway, "nowhere", np.zeros(4, dtype=np.float32))
    assert "model 'nowhere' is not served by any node" in caught.value.message()
    assert caught.value.status() in ("404", "StatusCode.NOT_FOUND")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_model_ready_nowhere_is_unavailable(protocol: str, gateway: RunningServer) -> None:
    with pytest.raises(InferenceServerException) as caught:
        _infer(protocol, gateway, "broken", np.zeros(4, dtype=np.float32))
    assert "model 'broken' is not ready on any reachable node" in caught.value.message()
    assert caught.value.status() in ("503", "StatusCode.UNAVAILABLE")


def test_bodies_over_the_limit_are_refused(nodes: dict[str, RunningServer], tmp_path: Path) -> None:
    with running_gateway(tmp_path, nodes, "--max-body-bytes", "1000") as gw:
        status_code, body = infer_json(gw.http_url, "ident", [0.0] * 400)
        assert status_code == 413 and "limit of 1000 bytes (--max-body-bytes)" in body["error"]
        channel = grpc.insecure_channel(gw.grpc_url)
        request = pb.inference.ModelInferRequest(model_name="ident")
        request.raw_input_contents.append(b"\x00" * 2000)
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(request.SerializeToString(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        channel.close()


def test_a_malformed_grpc_request_is_invalid_argument(gateway: RunningServer) -> None:
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x0a\x05ab", timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_lpt_packing_measures_costs_from_the_nodes_statistics(
    nodes: dict[str, RunningServer], tmp_path: Path
) -> None:
    args = ("--policy", "lpt_packing", "--placement-interval", "0.2", "--health-interval", "0.1")
    with running_gateway(tmp_path, nodes, *args) as gw:
        placed = status(gw)["placement"]
        assert set(LPT_COSTS) <= set(placed)  # every model has a node before any traffic

        def measured() -> bool:
            for _ in range(5):
                assert infer_json(gw.http_url, "slow", [5.0])[0] == 200  # 5 ms each
            return status(gw)["costs"]["slow"] > 0

        wait_until(measured, what="a measured cost for 'slow'")
        after = status(gw)
        # one node serves 'slow' under its placement
        assert after["placement"]["slow"] in ("a", "b")
        assert after["costs"]["slow"] > after["costs"]["ident"]
