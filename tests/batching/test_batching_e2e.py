"""Dynamic batching and queue policy end to end, driven by the real tritonclient.

What the batcher and the device scheduler decide (cut sizes, delays, priorities, ordering,
fair and edf sharing) is tested in-process and deterministically in tests/core/test_batcher.py;
these tests check what only a real server shows: protocols, status codes, cancellation by a
departing client, real runtimes and real concurrency.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, write_model
from observability.scrape import scrape, value, wait_for
from tritonclient.utils import InferenceServerException

from kernelport.config import demo_repository


def _stats(server: RunningServer, model: str) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return dict(client.get_inference_statistics(model)["model_stats"][0])
    finally:
        client.close()


def _input(name: str, array: np.ndarray, dtype: str = "FP32") -> grpc_aio.InferInput:
    inp = grpc_aio.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array)
    return inp


def _in_flight(server: RunningServer) -> float:
    return value(scrape(server.metrics_port), "kernelport_requests_in_flight")


def _wait_in_flight(server: RunningServer, count: int) -> None:
    wait_for(lambda: _in_flight(server) >= count, f"{count} requests in flight")


async def _executing(server: RunningServer, count: int) -> None:
    """Until ``count`` requests are inside the server (queued or running): a condition the
    test waits on, not a guess at how long sending takes."""
    await asyncio.to_thread(_wait_in_flight, server, count)


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("batching")
    # name -> (dims, max_batch_size, instances, backend parameters, dynamic_batching)
    models: dict[str, tuple[list[int], int, int, dict[str, Any], dict[str, Any]]] = {
        "batched": ([4], 16, 1, {"delay_ms": 2}, {"max_queue_delay_us": 2000}),
        "ragged": ([-1], 8, 1, {"delay_ms": 1}, {"max_queue_delay_us": 3000}),
        "bucketed": (
            [-1], 16, 1, {"delay_ms": 1},
            {"max_queue_delay_us": 5000, "ragged_buckets": {"INPUT0": [4, 8]}},
        ),
        "ordered": ([1], 4, 2, {"delay_ms_from": "INPUT0"}, {"preserve_ordering": True}),
        "unordered": ([1], 4, 2, {"delay_ms_from": "INPUT0"}, {}),
        "tiny_queue": ([1], 1, 1, {"delay_ms": 300}, {"max_queue_size": 2}),
        "slow": (
            [1], 1, 1, {"delay_ms_from": "INPUT0"},
            {"priority_levels": 2, "default_priority_level": 2},
        ),
    }  # fmt: skip
    for name, (dims, max_batch, instances, params, batching) in models.items():
        config = identity_config(
            "FP32", dims, max_batch_size=max_batch, instance_count=instances,
            parameters=params, dynamic_batching=batching,
        )  # fmt: skip
        write_model(repo, name, config)
    shutil.copytree(demo_repository() / "simple", repo / "ort_simple")
    (repo / "ort_simple" / "model.yaml").write_text(
        "backend: onnxruntime\nmax_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 1000\n"
    )
    with running_server(repo, repo, wait_for="ready") as server:
        yield server


async def _gather(
    server: RunningServer, calls: list[tuple[str, list[Any], dict[str, Any]]]
) -> list[Any]:
    client = grpc_aio.InferenceServerClient(server.grpc_url)
    try:
        return await asyncio.gather(
            *(client.infer(model, inputs, **kw) for model, inputs, kw in calls),
            return_exceptions=True,
        )
    finally:
        await client.close()


async def _mixed_protocols(
    server: RunningServer, model: str, arrays: list[np.ndarray]
) -> list[Any]:
    """Half the requests over gRPC, half over HTTP, all in flight at once.

    (Over 1,000 calls in flight on one grpc.aio client process make grpcio itself fail a few
    with CANCELLED, even against a bare grpc.aio server, so the load is spread over both.)
    """
    import tritonclient.http.aio as http_aio

    grpc_client = grpc_aio.InferenceServerClient(server.grpc_url)
    http_client = http_aio.InferenceServerClient(server.http_url, conn_limit=len(arrays))

    def call(i: int, array: np.ndarray) -> Any:
        if i % 2:
            return grpc_client.infer(model, [_input("INPUT0", array)])
        inp = http_aio.InferInput("INPUT0", list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        return http_client.infer(model, [inp])

    try:
        return await asyncio.gather(
            *(call(i, a) for i, a in enumerate(arrays)), return_exceptions=True
        )
    finally:
        await grpc_client.close()
        await http_client.close()


def test_concurrent_requests_are_batched_without_cross_talk(batching_server: RunningServer) -> None:
    before = _stats(batching_server, "batched")
    n = 1200
    rng = np.random.default_rng(0)
    # Each request carries 1-3 rows of distinct values; every caller must get exactly its own.
    arrays = [
        rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(n)
    ]
    results = asyncio.run(_mixed_protocols(batching_server, "batched", arrays))
    for array, result in zip(arrays, results, strict=True):
        assert not isinstance(result, Exception), repr(result)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)
    after = _stats(batching_server, "batched")
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    assert inferences == sum(len(a) for a in arrays)
    assert executions < n / 3, f"{executions} executions for {n} requests"
    sizes = {int(b["batch_size"]) for b in after["batch_stats"]}
    assert max(sizes) > 8 and max(sizes) <= 16, sizes


def test_onnxruntime_model_batches_with_real_clients(batching_server: RunningServer) -> None:
    n = 400
    arrays = [np.full((1, 16), i, np.int32) for i in range(n)]
    calls = [
        ("ort_simple", [_input("INPUT0", a, "INT32"), _input("INPUT1", a, "INT32")], {})
        for a in arrays
    ]
    results = asyncio.run(_gather(batching_server, calls))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2 * i))
    stats = _stats(batching_server, "ort_simple")
    assert int(stats["execution_count"]) < n


def test_mixed_shapes_never_share_a_batch(batching_server: RunningServer) -> None:
    lengths = [3, 5, 7] * 60
    arrays = [np.full((1, k), k * 10 + i % 7, np.float32) for i, k in enumerate(lengths)]
    results = asyncio.run(
        _gather(batching_server, [("ragged", [_input("INPUT0", a)], {}) for a in arrays])
    )
    for array, result in zip(arrays, results, strict=True):
        assert not isinstance(result, Exception), repr(result)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)
    stats = _stats(batching_server, "ragged")
    assert int(stats["execution_count"]) < len(arrays)  # batching happened within each shape


def test_oversize_request_is_split_and_rejoined(batching_server: RunningServer) -> None:
    before = _stats(batching_server, "batched")
    big = np.arange(37 * 4, dtype=np.float32).reshape(37, 4)
    (result,) = asyncio.run(_gather(batching_server, [("batched", [_input("INPUT0", big)], {})]))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), big)
    after = _stats(batching_server, "batched")
    assert int(after["execution_count"]) - int(before["execution_count"]) >= 3  # 16 + 16 + 5


def _delays(values: list[float]) -> list[np.ndarray]:
    return [np.array([[v]], np.float32) for v in values]


def test_full_queue_rejects_while_other_models_serve(batching_server: RunningServer) -> None:
    async def scenario() -> list[Any]:
        client = grpc_aio.InferenceServerClient(batching_server.grpc_url)
        try:
            flood = [
                asyncio.create_task(client.infer("tiny_queue", [_input("INPUT0", a)]))
                for a in _delays([0] * 8)
            ]
            # 1 running + 2 queued fill tiny_queue; another model is not held up by it.
            await _executing(batching_server, 3)
            other = await client.infer("batched", [_input("INPUT0", np.ones((1, 4), np.float32))])
            assert other.as_numpy("OUTPUT0").shape == (1, 4)
            return await asyncio.gather(*flood, return_exceptions=True)
        finally:
            await client.close()

    results = asyncio.run(scenario())
    rejected = [r for r in results if isinstance(r, InferenceServerException)]
    assert len(rejected) >= 4
    assert all("RESOURCE_EXHAUSTED" in str(r.status()) for r in rejected)
    assert all("queue is full" in r.message() for r in rejected)
    # Over HTTP the same overflow is a 503.
    http = httpclient.InferenceServerClient(batching_server.http_url, concurrency=8)
    inp = httpclient.InferInput("INPUT0", [1, 1], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1), np.float32))
    futures = [http.async_infer("tiny_queue", [inp]) for _ in range(6)]
    statuses = []
    for f in futures:
        try:
            f.get_result()
            statuses.append("200")
        except InferenceServerException as exc:
            statuses.append(str(exc.status()))
    http.close()
    assert "503" in statuses and "200" in statuses


def test_timeout_drops_work_before_it_runs(batching_server: RunningServer) -> None:
    before = _stats(batching_server, "slow")

    async def scenario() -> list[Any]:
        client = grpc_aio.InferenceServerClient(batching_server.grpc_url)
        try:
            blocker = asyncio.create_task(
                client.infer("slow", [_input("INPUT0", _delays([400])[0])])
            )
            await _executing(batching_server, 1)  # the blocker holds the only instance
            # timeout is in microseconds, as Triton's `timeout` parameter
            late = asyncio.create_task(
                client.infer("slow", [_input("INPUT0", _delays([1])[0])], timeout=50_000)
            )
            return await asyncio.gather(blocker, late, return_exceptions=True)
        finally:
            await client.close()

    blocker, late = asyncio.run(scenario())
    assert not isinstance(blocker, Exception)
    assert isinstance(late, InferenceServerException)
    assert "DEADLINE_EXCEEDED" in str(late.status()) and "timed out" in late.message()
    after = _stats(batching_server, "slow")
    assert int(after["execution_count"]) - int(before["execution_count"]) == 1  # never executed


def test_cancelled_request_is_dropped_before_execution(batching_server: RunningServer) -> None:
    before = _stats(batching_server, "slow")

    async def scenario() -> Any:
        client = grpc_aio.InferenceServerClient(batching_server.grpc_url)
        try:
            blocker = asyncio.create_task(
                client.infer("slow", [_input("INPUT0", _delays([1000])[0])])
            )
            await _executing(batching_server, 1)  # the blocker holds the only instance
            gone = client.infer("slow", [_input("INPUT0", _delays([1])[0])], client_timeout=0.1)
            with pytest.raises(InferenceServerException, match="Deadline"):
                await gone
            return await blocker
        finally:
            await client.close()

    asyncio.run(scenario())
    after = _stats(batching_server, "slow")
    assert int(after["execution_count"]) - int(before["execution_count"]) == 1


def test_a_request_its_client_cancels_is_dropped_before_execution(
    batching_server: RunningServer,
) -> None:
    # No deadline: the client resets the stream (RST_STREAM), and the queued request goes.
    before = _stats(batching_server, "slow")

    async def scenario() -> Any:
        client = grpc_aio.InferenceServerClient(batching_server.grpc_url)
        try:
            blocker = asyncio.create_task(
                client.infer("slow", [_input("INPUT0", _delays([1000])[0])])
            )
            await _executing(batching_server, 1)  # the blocker holds the only instance
            gone = asyncio.create_task(client.infer("slow", [_input("INPUT0", _delays([1])[0])]))
            await _executing(batching_server, 2)  # queued behind it
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            await asyncio.to_thread(
                wait_for, lambda: _in_flight(batching_server) == 1, "the cancelled one gone"
            )
            return await blocker
        finally:
            await client.close()

    asyncio.run(scenario())
    after = _stats(batching_server, "slow")
    assert int(after["execution_count"]) - int(before["execution_count"]) == 1


def test_edf_sheds_requests_that_cannot_meet_their_deadline(tmp_path: Path) -> None:
    repo = tmp_path / "edf"
    write_model(
        repo,
        "slow100",
        identity_config(
            "FP32",
            [1],
            max_batch_size=1,
            parameters={"delay_ms": 100},
            dynamic_batching={},
        ),
    )
    with running_server(tmp_path, repo, "--scheduler", "edf", wait_for="ready") as server:

        async def scenario() -> tuple[Any, Any]:
            client = grpc_aio.InferenceServerClient(server.grpc_url)
            try:
                one = np.ones((1, 1), np.float32)
                await client.infer("slow100", [_input("INPUT0", one)])  # learns the ~100 ms cost
                hopeless = await asyncio.gather(
                    client.infer("slow100", [_input("INPUT0", one)], timeout=30_000),
                    return_exceptions=True,
                )
                feasible = await client.infer("slow100", [_input("INPUT0", one)], timeout=2_000_000)
                return hopeless[0], feasible
            finally:
                await client.close()

        hopeless, feasible = asyncio.run(scenario())
        stats = _stats(server, "slow100")
    assert isinstance(hopeless, InferenceServerException)
    assert "DEADLINE_EXCEEDED" in str(hopeless.status())
    assert "cannot meet its deadline" in hopeless.message()
    assert feasible.as_numpy("OUTPUT0").shape == (1, 1)
    assert int(stats["execution_count"]) == 2  # the hopeless request never ran


def test_http_client_disconnect_drops_queued_request(batching_server: RunningServer) -> None:
    import json
    import socket

    before = _stats(batching_server, "slow")

    async def scenario() -> None:
        client = grpc_aio.InferenceServerClient(batching_server.grpc_url)
        try:
            blocker = asyncio.create_task(
                client.infer("slow", [_input("INPUT0", _delays([1000])[0])])
            )
            await _executing(batching_server, 1)  # the blocker holds the only instance
            body = json.dumps(
                {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}
            ).encode()
            request = (
                f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            # Send a request that queues behind the blocker, then hang up.
            with socket.create_connection(("127.0.0.1", batching_server.http_port)) as sock:
                sock.sendall(request)
                await _executing(batching_server, 2)  # queued behind the blocker
            await blocker
        finally:
            await client.close()

    asyncio.run(scenario())
    after = _stats(batching_server, "slow")
    assert int(after["execution_count"]) - int(before["execution_count"]) == 1
    assert int(after["inference_stats"]["fail"]["count"]) > int(
        before["inference_stats"]["fail"]["count"]
    )


def test_ragged_dimension_is_padded_to_buckets(batching_server: RunningServer) -> None:
    lengths = [2, 3, 4] * 16
    arrays = [np.full((1, k), k, np.float32) for k in lengths]
    results = asyncio.run(_mixed_protocols(batching_server, "bucketed", arrays))
    for array, result in zip(arrays, results, strict=True):
        assert not isinstance(result, Exception), repr(result)
        out = result.as_numpy("OUTPUT0")
        assert out.shape == (1, 4)  # padded up to the bucket
        np.testing.assert_array_equal(out[:, : array.shape[1]], array)
        assert not out[:, array.shape[1] :].any()  # with pad_value 0
    stats = _stats(batching_server, "bucketed")
    # All three lengths fall in bucket 4, so they batch together: a batch bigger than any one
    # length's share of a 48-request burst shows that.
    assert max(int(b["batch_size"]) for b in stats["batch_stats"]) > 6
