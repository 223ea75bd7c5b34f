"""Hot reload under concurrent inference: a reload fails no request and answers switch from the
old version to the new; an unload lets in-flight requests finish and answers the rest with a
clean UNAVAILABLE."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import write_model
from lifecycle_helpers import add_once, onnx_add, wait_for
from tritonclient.utils import InferenceServerException

WORKERS = 16
HOT_YAML = (
    "backend: onnxruntime\nmax_batch_size: 8\ninstance_count: 2\n"
    "dynamic_batching:\n  max_queue_delay_us: 2000\n"
)
SLOW_MODEL = """
import pathlib, time

class Model:
    def load(self, config):
        self.marker = pathlib.Path(config.parameters["marker"])

    def execute(self, inputs):
        self.marker.write_text("executing")
        time.sleep(0.5)
        return {"OUTPUT0": inputs["INPUT0"]}
"""


@dataclass
class Traffic:
    """What each worker saw, in the order it saw it: an answer, or the error's text."""

    seen: list[list[float | str]] = field(default_factory=lambda: [[] for _ in range(WORKERS)])

    @property
    def answers(self) -> list[float]:
        return [a for w in self.seen for a in w if isinstance(a, float)]

    @property
    def errors(self) -> list[str]:
        return [a for w in self.seen for a in w if isinstance(a, str)]


async def _with_traffic(
    server: RunningServer, model: str, change: Callable[[], Awaitable[None]], new: float
) -> Traffic:
    """Keep WORKERS request loops running; apply ``change`` once 200 requests have been
    answered; stop once every worker has seen the ``new`` answer, 200 requests later."""
    traffic = Traffic()
    client = grpc_aio.InferenceServerClient(server.grpc_url)
    done = asyncio.Event()
    inp = grpc_aio.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), np.float32))

    async def worker(i: int) -> None:
        while not done.is_set():
            try:
                result = await client.infer(model, [inp])
                traffic.seen[i].append(float(result.as_numpy("OUTPUT0")[0, 0]))
            except InferenceServerException as exc:
                traffic.seen[i].append(f"{exc.status()} {exc.message()}")
                await asyncio.sleep(0.005)  # an unloaded model answers at once: don't spin

    tasks = [asyncio.create_task(worker(i)) for i in range(WORKERS)]
    try:
        async with asyncio.timeout(30):
            while len(traffic.answers) < 200:
                await asyncio.sleep(0.01)
            await change()
            while not all(new in w for w in traffic.seen):
                await asyncio.sleep(0.01)
            target = len(traffic.answers) + 200
            while len(traffic.answers) < target:
                await asyncio.sleep(0.01)
    finally:
        done.set()
        await asyncio.gather(*tasks)
        await client.close()
    return traffic


def _switched_once(traffic: Traffic, old: float, new: float) -> None:
    """Each worker saw old answers, then new ones, never old after new."""
    for answers in traffic.seen:
        values = [a for a in answers if isinstance(a, float)]
        assert set(values) <= {old, new}, set(values)
        first_new = values.index(new)
        assert first_new > 0 and old not in values[first_new:]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("hot")
    for name in ("hot_poll", "hot_explicit"):
        write_model(repo, name, files={"model.onnx": onnx_add(1.0)})
        (repo / name / "model.yaml").write_text(HOT_YAML)
    marker = repo.parent / "slow-marker"
    write_model(repo, "slow", {
        "backend": "python", "max_batch_size": 0, "parameters": {"marker": str(marker)},
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [1]}],
    }, files={"model.py": SLOW_MODEL.encode()})  # fmt: skip
    return repo


@pytest.fixture(scope="module")
def poll_server(repo: Path) -> Iterator[RunningServer]:
    args = ("--model-control-mode", "poll", "--repository-poll-debounce-secs", "0.3")
    with running_server(repo, repo, *args, wait_for="ready") as server:
        yield server


@pytest.fixture(scope="module")
def explicit_server(repo: Path) -> Iterator[RunningServer]:
    args = ("--model-control-mode", "explicit", "--load-model", "hot_explicit",
            "--allow-model-upload")  # fmt: skip
    with running_server(repo, repo, *args, "--load-model", "slow", wait_for="ready") as server:
        yield server


async def test_file_replaced_in_poll_mode_fails_no_request(
    poll_server: RunningServer, repo: Path
) -> None:
    async def replace() -> None:
        staging = repo.parent / "hot-staging.onnx"
        staging.write_bytes(onnx_add(2.0))
        os.replace(staging, repo / "hot_poll" / "1" / "model.onnx")

    traffic = await _with_traffic(poll_server, "hot_poll", replace, new=2.0)
    assert traffic.errors == []
    assert len(traffic.answers) >= 400
    _switched_once(traffic, 1.0, 2.0)


async def test_reload_through_the_api_fails_no_request(explicit_server: RunningServer) -> None:
    async def reload() -> None:
        client = grpc_aio.InferenceServerClient(explicit_server.grpc_url)
        try:
            await client.load_model(
                "hot_explicit",
                config='{"backend": "onnxruntime", "max_batch_size": 8}',
                files={"file:1/model.onnx": onnx_add(3.0)},
            )
        finally:
            await client.close()

    traffic = await _with_traffic(explicit_server, "hot_explicit", reload, new=3.0)
    assert traffic.errors == []
    _switched_once(traffic, 1.0, 3.0)


async def test_unload_then_load_gives_only_clean_errors(
    explicit_server: RunningServer, repo: Path
) -> None:
    async def unload_and_load() -> None:
        client = grpc_aio.InferenceServerClient(explicit_server.grpc_url)
        try:
            await client.unload_model("hot_explicit")
            (repo / "hot_explicit" / "1" / "model.onnx").write_bytes(onnx_add(4.0))
            await asyncio.sleep(0.2)  # traffic against the unloaded model
            await client.load_model("hot_explicit")
        finally:
            await client.close()

    old = add_once(httpclient.InferenceServerClient(explicit_server.http_url), "hot_explicit")
    traffic = await _with_traffic(explicit_server, "hot_explicit", unload_and_load, new=4.0)
    assert traffic.errors, "some requests should have arrived while the model was unloaded"
    for error in traffic.errors:
        assert error.startswith("StatusCode.UNAVAILABLE model 'hot_explicit' is not ready ("), error
        assert any(s in error for s in ("(UNLOADING", "(UNAVAILABLE: unloaded", "(LOADING")), error
    _switched_once(traffic, old, 4.0)


def test_unload_waits_for_the_request_in_flight(explicit_server: RunningServer, repo: Path) -> None:
    marker = repo.parent / "slow-marker"
    marker.unlink(missing_ok=True)
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    inp = httpclient.InferInput("INPUT0", [1], "FP32")
    inp.set_data_from_numpy(np.array([5], np.float32))
    outcome: list[object] = []
    sender = threading.Thread(target=lambda: outcome.append(client.infer("slow", [inp])))
    sender.start()
    wait_for(marker.exists, 10, "the request is executing")
    control = httpclient.InferenceServerClient(explicit_server.http_url)
    control.unload_model("slow")  # returns once the request in flight has finished
    sender.join(timeout=10)
    assert len(outcome) == 1 and outcome[0].as_numpy("OUTPUT0")[0] == 5.0  # type: ignore[attr-defined]
    with pytest.raises(InferenceServerException, match="not ready"):
        control.infer("slow", [inp])
    client.close()
    control.close()
