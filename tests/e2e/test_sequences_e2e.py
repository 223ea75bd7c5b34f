"""Sequence models (Triton's sequence_batching) from a config.pbtxt written as Triton's docs
write it: a Python accumulator keeps each sequence's running sum in its instance, keyed by
the correlation id the server passes in CORRID. 50 sequences interleaved over tritonclient
(HTTP and gRPC, concurrently) give the answers each sequence gives alone. The same with
implicit state: an ONNX accumulator whose running sum the server keeps per sequence."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import client_for
from sequence_models import STATE_ACCUMULATOR_PBTXT, onnx_accumulator, sequence_values
from tritonclient.utils import InferenceServerException

ACCUMULATOR_PBTXT = """
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "SUM" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 60000000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
}
"""

ACCUMULATOR_PY = """
import numpy as np


class Model:
    def __init__(self):
        self.sums = {}

    def execute(self, inputs):
        # One row per sequence: a batch may hold requests of several sequences.
        out = np.zeros((len(inputs["X"]), 1), np.int32)
        for row in range(len(out)):
            corrid = int(inputs["CORRID"][row, 0])
            assert int(inputs["READY"][row, 0]) == 1
            if int(inputs["START"][row, 0]):
                self.sums[corrid] = 0
            self.sums[corrid] += int(inputs["X"][row, 0])
            out[row, 0] = self.sums[corrid]
            if int(inputs["END"][row, 0]):
                del self.sums[corrid]
        return {"SUM": out}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("sequences")
    (repo / "acc" / "1").mkdir(parents=True)
    (repo / "acc" / "config.pbtxt").write_text(ACCUMULATOR_PBTXT)
    (repo / "acc" / "1" / "model.py").write_text(ACCUMULATOR_PY)
    (repo / "state" / "1").mkdir(parents=True)
    (repo / "state" / "config.pbtxt").write_text(STATE_ACCUMULATOR_PBTXT)
    (repo / "state" / "1" / "model.onnx").write_bytes(onnx_accumulator())
    # the same in a worker process
    worker = 'parameters { key: "KP_EXECUTION_MODE" value: { string_value: "worker" } }\n'
    (repo / "state_worker" / "1").mkdir(parents=True)
    (repo / "state_worker" / "config.pbtxt").write_text(STATE_ACCUMULATOR_PBTXT + worker)
    (repo / "state_worker" / "1" / "model.onnx").write_bytes(onnx_accumulator())
    with running_server(repo, repo) as running:
        yield running


def _step(client: Any, corrid: int, value: int, start: bool, end: bool) -> int:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    inp = module.InferInput("X", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], np.int32))
    result = client.infer("acc", [inp], sequence_id=corrid, sequence_start=start, sequence_end=end)
    return int(result.as_numpy("SUM")[0, 0])


def _values(corrid: int) -> list[int]:
    return [(corrid * 7 + i * 3) % 11 for i in range(4 + corrid % 3)]


def test_fifty_interleaved_sequences_match_each_alone(server: RunningServer) -> None:
    ids = list(range(1, 51))
    got: dict[int, list[int]] = {i: [] for i in ids}
    errors: list[BaseException] = []

    def drive(protocol: str, mine: list[int]) -> None:
        client = client_for(protocol, server)
        try:
            longest = max(len(_values(i)) for i in mine)
            for step in range(longest):  # one request of each live sequence per round
                for corrid in mine:
                    values = _values(corrid)
                    if step < len(values):
                        start, end = step == 0, step == len(values) - 1
                        got[corrid].append(_step(client, corrid, values[step], start, end))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [
        threading.Thread(target=drive, args=(protocol, ids[i::4]))
        for i, protocol in enumerate(("http", "grpc", "http", "grpc"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    for corrid in ids:
        assert got[corrid] == list(np.cumsum(_values(corrid))), corrid


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sequence_errors(server: RunningServer, protocol: str) -> None:
    client = client_for(protocol, server)
    try:
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            _step(client, 999_999, 1, start=False, end=False)
        with pytest.raises(InferenceServerException, match="non-zero or non-empty correlation"):
            _step(client, 0, 1, start=True, end=False)
        # an ended sequence is gone: its next request must START again
        assert _step(client, 777, 5, start=True, end=True) == 5
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            _step(client, 777, 1, start=False, end=False)
        config = client.get_model_config("acc", **({"as_json": True} if protocol == "grpc" else {}))
        config = config.get("config", config)
        assert config["sequence_batching"]["max_sequence_idle_microseconds"] in (
            60000000, "60000000"
        )  # fmt: skip
    finally:
        client.close()


def _state_step(
    client: Any, corrid: int, value: float, start: bool, end: bool, model: str = "state"
) -> float:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    inp = module.InferInput("INPUT", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([[value]], np.float32))
    result = client.infer(model, [inp], sequence_id=corrid, sequence_start=start, sequence_end=end)
    return float(result.as_numpy("OUTPUT")[0, 0])


def test_implicit_state_over_fifty_interleaved_sequences(server: RunningServer) -> None:
    ids = list(range(1, 51))
    got: dict[int, list[float]] = {i: [] for i in ids}
    errors: list[BaseException] = []

    def drive(protocol: str, mine: list[int]) -> None:
        client = client_for(protocol, server)
        try:
            for step in range(max(len(sequence_values(i)) for i in mine)):
                for corrid in mine:  # one request of each live sequence per round
                    values = sequence_values(corrid)
                    if step < len(values):
                        start, end = step == 0, step == len(values) - 1
                        got[corrid].append(_state_step(client, corrid, values[step], start, end))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [
        threading.Thread(target=drive, args=(protocol, ids[i::4]))
        for i, protocol in enumerate(("http", "grpc", "http", "grpc"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    alone = {}
    client = client_for("http", server)
    try:  # each sequence by itself, after the others: the same answers
        for corrid in ids[:10]:
            values = sequence_values(corrid)
            alone[corrid] = [
                _state_step(client, corrid, v, i == 0, i == len(values) - 1)
                for i, v in enumerate(values)
            ]
    finally:
        client.close()
    for corrid in ids:
        assert got[corrid] == list(np.cumsum(sequence_values(corrid))), corrid
        assert corrid not in alone or alone[corrid] == got[corrid]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_implicit_state_is_hidden_from_metadata(server: RunningServer, protocol: str) -> None:
    client = client_for(protocol, server)
    try:
        kw = {"as_json": True} if protocol == "grpc" else {}
        meta = client.get_model_metadata("state", **kw)
        assert [t["name"] for t in meta["inputs"]] == ["INPUT"]
        assert [t["name"] for t in meta["outputs"]] == ["OUTPUT"]
        config = client.get_model_config("state", **kw)
        config = config.get("config", config)
        state = config["sequence_batching"]["state"][0]
        assert (state["input_name"], state["output_name"]) == ("ACC_IN", "ACC_OUT")
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_implicit_state_in_a_worker_process(server: RunningServer, protocol: str) -> None:
    client = client_for(protocol, server)
    try:
        ids = list(range(100, 110))
        got: dict[int, list[float]] = {i: [] for i in ids}
        for step in range(max(len(sequence_values(i)) for i in ids)):
            for corrid in ids:  # interleaved: one request of each live sequence per round
                values = sequence_values(corrid)
                if step < len(values):
                    start, end = step == 0, step == len(values) - 1
                    value = _state_step(client, corrid, values[step], start, end, "state_worker")
                    got[corrid].append(value)
        for corrid in ids:
            assert got[corrid] == list(np.cumsum(sequence_values(corrid))), corrid
    finally:
        client.close()
