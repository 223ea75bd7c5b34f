"""A request far above max_batch_size runs as a stream of pieces, linear in its rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from conftest import running_server
from helpers import identity_config, write_model

from kernelport.config import Config
from kernelport.core.batcher import ModelQueue
from kernelport.server import Server
from kernelport.types import InferRequest, Tensor

ROWS = 100_000


def test_100k_rows_through_max_batch_size_4(tmp_path: Path) -> None:
    write_model(tmp_path / "repo", "echo", identity_config("FP32", [2], max_batch_size=4))
    x = np.arange(ROWS * 2, dtype=np.float32).reshape(ROWS, 2)
    with running_server(tmp_path, tmp_path / "repo", wait_for="ready") as server:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=300.0)
        inp = httpclient.InferInput("INPUT0", [ROWS, 2], "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        result = client.infer("echo", [inp], outputs=[out])
        assert np.array_equal(result.as_numpy("OUTPUT0"), x)
        # the server still answers small requests afterwards
        assert client.is_server_ready()
        client.close()


async def test_split_keeps_the_queue_short(tmp_path: Path) -> None:
    """Structural linearity: however many rows, the queue never holds more than a handful of
    pieces, so every batch cut looks at O(max_batch_size) requests, not O(rows)."""
    write_model(tmp_path, "echo", identity_config("FP32", [2], max_batch_size=4))
    server = Server(Config(model_repository=(tmp_path,)))
    await server.manager.load_initial()
    model = server.manager.get("echo")
    peak = 0
    enqueue = ModelQueue._enqueue  # queues one piece

    def counting(self: ModelQueue, *args: object, **kwargs: object) -> object:
        nonlocal peak
        peak = max(peak, self.queued + 1)
        return enqueue(self, *args, **kwargs)  # type: ignore[arg-type]

    model.queue._enqueue = counting.__get__(model.queue)  # type: ignore[method-assign]
    rows = 4_000
    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    try:
        response = await server.dataplane.infer(
            InferRequest("echo", inputs=[Tensor("INPUT0", "FP32", (rows, 2), x)])
        )
        assert np.array_equal(response.outputs[0].data, x)
        assert response.batch_size == rows
        assert 0 < peak <= len(model.pool.workers) + 1, peak
    finally:
        await server.manager.close()


async def test_a_failed_piece_fails_the_request_and_cancels_the_rest(tmp_path: Path) -> None:
    write_model(tmp_path, "echo", identity_config("FP32", [2], max_batch_size=4))
    server = Server(Config(model_repository=(tmp_path,)))
    await server.manager.load_initial()
    model = server.manager.get("echo")
    calls = 0
    enqueue = ModelQueue._enqueue  # queues one piece

    def failing(self: ModelQueue, *args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("piece 3 failed")
        return enqueue(self, *args, **kwargs)  # type: ignore[arg-type]

    model.queue._enqueue = failing.__get__(model.queue)  # type: ignore[method-assign]
    x = np.zeros((400, 2), np.float32)
    try:
        request = InferRequest("echo", inputs=[Tensor("INPUT0", "FP32", (400, 2), x)])
        try:
            await server.dataplane.infer(request)
        except RuntimeError as exc:
            assert "piece 3" in str(exc)
        else:
            raise AssertionError("the failed piece did not fail the request")
        assert calls < 10  # pieces stop being submitted once one failed
        assert server.dataplane.in_flight == 0
    finally:
        await server.manager.close()
