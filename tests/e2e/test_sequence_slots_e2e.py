"""Triton's ``direct`` sequence strategy over tritonclient (HTTP and gRPC, concurrently): a
config.pbtxt with ``direct { }`` and a Python model that keeps each running sum by batch row
and answers with the row and instance it ran in. 2 x max_batch_size sequences interleaved
over two instances give the answers each gives alone, each always in one row; a START that
finds every slot taken waits, bounded by its timeout. In process:
tests/core/test_direct_sequences.py."""

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
from slot_models import SLOTS_PBTXT, SLOTS_PY, slot_values
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("slots")
    (repo / "slots" / "1").mkdir(parents=True)
    (repo / "slots" / "config.pbtxt").write_text(SLOTS_PBTXT)
    (repo / "slots" / "1" / "model.py").write_text(SLOTS_PY)
    with running_server(repo, repo) as running:
        yield running


def _step(
    client: Any, corrid: int, value: int, start: bool, end: bool, **kw: Any
) -> tuple[int, ...]:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    inp = module.InferInput("X", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], np.int32))
    result = client.infer(
        "slots", [inp], sequence_id=corrid, sequence_start=start, sequence_end=end, **kw
    )
    return tuple(int(result.as_numpy(name)[0, 0]) for name in ("SUM", "ROW", "INSTANCE"))


def _run(
    client: Any, corrid: int, started: threading.Barrier | None = None
) -> list[tuple[int, ...]]:
    values = slot_values(corrid)
    last = len(values) - 1
    got = []
    for i, v in enumerate(values):
        got.append(_step(client, corrid, v, i == 0, i == last))
        if i == 0 and started is not None:
            started.wait()  # every sequence holds its slot before any can end
    return got


def test_interleaved_sequences_keep_their_rows_and_match_each_alone(server: RunningServer) -> None:
    ids = [11, 12, 13, 14]  # 2 x max_batch_size: every slot of both instances
    got: dict[int, list[tuple[int, ...]]] = {}
    errors: list[BaseException] = []
    started = threading.Barrier(len(ids), timeout=60)

    def drive(protocol: str, corrid: int) -> None:
        client = client_for(protocol, server)
        try:
            got[corrid] = _run(client, corrid, started)
        except BaseException as exc:
            started.abort()
            errors.append(exc)
        finally:
            client.close()

    threads = [
        threading.Thread(target=drive, args=(protocol, corrid))
        for corrid, protocol in zip(ids, ("http", "grpc", "grpc", "http"), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    places = set()
    for corrid in ids:
        assert [a[0] for a in got[corrid]] == list(np.cumsum(slot_values(corrid))), corrid
        where = {a[1:] for a in got[corrid]}
        assert len(where) == 1, (corrid, where)  # the same row of the same instance throughout
        places |= where
    assert len(places) == 4
    for protocol in ("http", "grpc"):  # each alone gives the same sums
        client = client_for(protocol, server)
        try:
            for corrid in ids:
                assert [a[0] for a in _run(client, corrid)] == [a[0] for a in got[corrid]]
        finally:
            client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_start_waits_while_every_slot_is_taken(server: RunningServer, protocol: str) -> None:
    client = client_for(protocol, server)
    try:
        for corrid in (21, 22, 23, 24):
            _step(client, corrid, 1, start=True, end=False)
        with pytest.raises(InferenceServerException, match="free sequence slot") as caught:
            _step(client, 25, 1, start=True, end=False, timeout=100_000)
        want = "StatusCode.DEADLINE_EXCEEDED" if protocol == "grpc" else "504"
        assert str(caught.value.status()) == want
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            _step(client, 25, 1, start=False, end=False)  # it never started
        assert _step(client, 21, 2, start=False, end=True)[0] == 3  # frees a slot
        assert _step(client, 25, 4, start=True, end=False)[0] == 4
        for corrid in (22, 23, 24, 25):
            _step(client, corrid, 0, start=False, end=True)
        kw = {"as_json": True} if protocol == "grpc" else {}
        config = client.get_model_config("slots", **kw)
        config = config.get("config", config)
        assert "direct" in config["sequence_batching"], config["sequence_batching"]
    finally:
        client.close()
