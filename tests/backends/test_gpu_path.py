"""The device execution path (backends/gpu.py): everything that runs on CPU, and the CUDA path
itself where a GPU exists (``-m gpu``; skipped on CPU-only machines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from kernelport.backends.gpu import (
    DeviceRunner,
    IOSpec,
    RunnerOptions,
    batch_buckets,
    bucket_for,
    name_outputs,
    resolve_device,
    to_numpy,
    to_torch,
)
from kernelport.errors import ErrorCode, ServerError

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- buckets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_batch", "preferred", "expected"),
    [
        (0, (), ()),
        (1, (), (1,)),
        (8, (), (1, 2, 4, 8)),
        (6, (), (1, 2, 4, 6)),
        (64, (), (1, 2, 4, 8, 16, 32, 64)),
        (16, (4, 8), (4, 8, 16)),  # the max is always a bucket, so every batch fits one
        (16, (16, 2), (2, 16)),
    ],
)
def test_batch_buckets(
    max_batch: int, preferred: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    assert batch_buckets(max_batch, preferred) == expected


def test_bucket_for_picks_the_smallest_that_fits() -> None:
    buckets = (1, 2, 4, 8)
    assert [bucket_for(r, buckets) for r in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ServerError, match="batch of 9 rows fits no batch-size bucket"):
        bucket_for(9, buckets)
    with pytest.raises(ServerError):
        bucket_for(0, buckets)


# --- devices -------------------------------------------------------------------------------


def test_cpu_device() -> None:
    assert resolve_device("cpu") == CPU


def test_cuda_unavailable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ServerError) as info:
        resolve_device("cuda:0")
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "device 'cuda:0' needs CUDA, which is not available" in info.value.message
    assert "use device 'cpu'" in info.value.message


def test_bad_cuda_index_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ServerError, match=r"device 'cuda:2' does not exist: 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    with pytest.raises(ServerError, match="expected 'cpu' or 'cuda:N'"):
        resolve_device("tpu:0")


# --- conversions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, np.int64, np.int8, np.uint8, np.bool_, ml_dtypes.bfloat16]
)
def test_numpy_torch_round_trip_shares_memory(dtype: Any) -> None:
    array = np.arange(6).reshape(2, 3).astype(dtype)
    tensor = to_torch(array)
    back = to_numpy(tensor)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    assert np.shares_memory(back, array)


def test_name_outputs() -> None:
    a, b = torch.zeros(1), torch.ones(1)
    assert name_outputs(a, ["A"]) == {"A": a}
    assert name_outputs((a, [b]), ["A", "B"]) == {"A": a, "B": b}
    assert name_outputs({"B": b, "A": a, "extra": a}, ["A", "B"]) == {"A": a, "B": b}
    with pytest.raises(ServerError, match=r"returned 2 value\(s\) but the config lists 1"):
        name_outputs((a, b), ["A"])
    with pytest.raises(ServerError, match="missing configured output"):
        name_outputs({"A": a}, ["A", "B"])
    with pytest.raises(ServerError, match="returned int, not a tensor"):
        name_outputs(3, ["A"])


# --- the runner on CPU ---------------------------------------------------------------------


class Recorder:
    """A 'model' that remembers what it was called with: y = 2 * x + 1, and the row count."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((tuple(x.shape), x.dtype))
        return x * 2 + 1, torch.full((x.shape[0], 1), x.shape[0], dtype=torch.int64)


IN = [IOSpec("x", torch.float32, (3,))]
OUT = [IOSpec("y", torch.float32, (3,)), IOSpec("rows", torch.int32, (1,))]


def test_runner_casts_inputs_and_outputs() -> None:
    model = Recorder()
    options = RunnerOptions(CPU, batching=True, compute_dtype=torch.float64, buckets=(1, 2, 4))
    runner = DeviceRunner(model, IN, OUT, options)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = runner.run({"x": x})
    assert model.calls == [((2, 3), torch.float64)]
    assert out["y"].dtype == np.float32 and out["rows"].dtype == np.int32  # configured dtypes
    np.testing.assert_array_equal(out["y"], x * 2 + 1)


def test_runner_never_lets_a_model_write_into_a_read_only_request() -> None:
    def in_place(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x.add_(1)
        return x, torch.ones((x.shape[0], 1))

    runner = DeviceRunner(in_place, IN, OUT, RunnerOptions(CPU, batching=True, buckets=(2,)))
    request = np.frombuffer(np.zeros(6, np.float32).tobytes(), np.float32).reshape(2, 3)
    assert not request.flags.writeable
    out = runner.run({"x": request})
    np.testing.assert_array_equal(out["y"], np.ones((2, 3)))
    np.testing.assert_array_equal(request, np.zeros((2, 3)))


def test_warmup_runs_every_bucket_on_zeros() -> None:
    model = Recorder()
    runner = DeviceRunner(model, IN, OUT, RunnerOptions(CPU, batching=True, buckets=(1, 2, 4)))
    assert runner.warmup() == [1, 2, 4]
    assert [shape for shape, _ in model.calls] == [(1, 3), (2, 3), (4, 3)]


def test_warmup_skips_variable_dims_and_reports_failures() -> None:
    ragged = [IOSpec("x", torch.float32, (-1,))]
    runner = DeviceRunner(Recorder(), ragged, OUT, RunnerOptions(CPU, batching=True, buckets=(1,)))
    assert runner.warmup() == []

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no zeros please")

    runner = DeviceRunner(broken, IN, OUT[:1], RunnerOptions(CPU, batching=True, buckets=(2, 4)))
    with pytest.raises(ServerError, match="warm-up at batch size 2 on zero inputs failed: Runtime"):
        runner.warmup()


def eager_graphs(log: list[str]) -> Callable[..., Any]:
    """A CPU stand-in for CUDA graph capture with the same contract: static outputs that a
    replay refills from the static inputs."""

    def capture(body: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], Callable[[], None]]:
        static = body()
        log.append("capture")

        def replay() -> None:
            log.append("replay")
            for name, value in body().items():
                static[name].copy_(value)

        return static, replay

    return capture


def test_graph_buckets_pad_and_slice() -> None:
    model = Recorder()
    log: list[str] = []
    options = RunnerOptions(CPU, batching=True, buckets=(2, 4, 8), cuda_graphs=True)
    runner = DeviceRunner(model, IN, OUT, options, graph_factory=eager_graphs(log))
    assert runner.graph_buckets == (2, 4, 8)
    assert log == ["capture"] * 3
    model.calls.clear()
    for rows, bucket in ((1, 2), (3, 4), (4, 4), (5, 8), (8, 8)):
        x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 1
        out = runner.run({"x": x})
        assert model.calls[-1][0] == (bucket, 3), f"{rows} rows should run in bucket {bucket}"
        assert out["y"].shape == (rows, 3) and out["rows"].shape == (rows, 1)
        np.testing.assert_array_equal(out["y"], x * 2 + 1)
        np.testing.assert_array_equal(out["rows"], np.full((rows, 1), bucket))


def test_graph_padding_is_zeroed_not_stale() -> None:
    seen: list[np.ndarray] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone().numpy())
        return x

    options = RunnerOptions(CPU, batching=True, buckets=(4,), cuda_graphs=True)
    runner = DeviceRunner(model, IN, OUT[:1], options, graph_factory=eager_graphs([]))
    runner.run({"x": np.full((4, 3), 7, np.float32)})
    runner.run({"x": np.full((1, 3), 5, np.float32)})
    np.testing.assert_array_equal(seen[-1][0], [5, 5, 5])
    np.testing.assert_array_equal(seen[-1][1:], np.zeros((3, 3)))


def test_graphs_for_a_model_that_does_not_batch() -> None:
    options = RunnerOptions(CPU, batching=False, cuda_graphs=True)
    runner = DeviceRunner(Recorder(), IN, OUT, options, graph_factory=eager_graphs([]))
    assert runner.graph_buckets == (0,)
    out = runner.run({"x": np.ones(3, np.float32)})
    np.testing.assert_array_equal(out["y"], np.full(3, 3.0))


def test_graphs_need_fixed_dims_and_cuda() -> None:
    options = RunnerOptions(CPU, batching=True, buckets=(1,), cuda_graphs=True)
    with pytest.raises(ServerError, match="cuda_graphs needs fixed input dims"):
        DeviceRunner(Recorder(), [IOSpec("x", torch.float32, (-1,))], OUT, options)
    with pytest.raises(ServerError, match="cuda_graphs needs a CUDA device"):
        DeviceRunner(Recorder(), IN, OUT, options)


# --- the real CUDA path (only where a GPU exists) ------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda_graphs"])
def test_cuda_runner_matches_cpu(graphs: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 3).eval()
    cuda = torch.device("cuda", 0)

    def run_on(device: torch.device, graphs: bool) -> dict[str, np.ndarray]:
        module = layer.to(device)

        def model(x: torch.Tensor) -> torch.Tensor:
            return module(x)

        options = RunnerOptions(device, batching=True, buckets=(1, 2, 4), cuda_graphs=graphs)
        runner = DeviceRunner(model, IN, OUT[:1], options)
        runner.warmup()
        x = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
        return runner.run({"x": x})

    expected = run_on(CPU, False)["y"]
    got = run_on(cuda, graphs)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_cuda_runner_has_its_own_stream() -> None:
    cuda = torch.device("cuda", 0)
    options = RunnerOptions(cuda, batching=True, buckets=(2,))
    seen: list[Any] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.cuda.current_stream())
        return x

    runner = DeviceRunner(model, IN, OUT[:1], options)
    runner.run({"x": np.ones((2, 3), np.float32)})
    assert seen[0] != torch.cuda.default_stream(cuda)
