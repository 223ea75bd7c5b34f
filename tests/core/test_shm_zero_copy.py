"""Inputs in a client's system shared-memory region reach a worker process without a copy:
the worker maps the region from a descriptor sent once (``core/placement.py``). Real
``python -m kernelport.worker`` children and real POSIX shm objects."""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import load_repository, write_model

from kernelport.core import shm
from kernelport.core.execution import BatchResult
from kernelport.core.manager import ModelManager
from kernelport.core.process_pool import ProcessPool
from kernelport.core.shm import SharedMemoryRegistry
from kernelport.core.wire import (
    REGION_BODY,
    FrameReader,
    Kind,
    TensorRef,
    frame_bytes,
    pack_refs,
    read_arrays,
    unpack_refs,
)
from kernelport.core.worker_regions import WorkerRegions
from kernelport.errors import ServerError
from kernelport.types import SharedMemoryRef, tensor_from_buffer

SHM = Path("/dev/shm")
ROWS, COLS = 512, 16  # 32 KiB of FP32 a request: in the arena if it were copied
NBYTES = ROWS * COLS * 4

MODEL = """
import numpy as np

class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        rows = x.shape[0]
        return {"OUTPUT0": x * 2, "WRITABLE": np.full((rows, 1), x.flags.writeable)}
"""


@pytest.fixture
def key(request: pytest.FixtureRequest) -> Iterator[str]:
    """A POSIX shm object the test owns (as a client would), removed afterwards."""
    name = f"kp_zc_{os.getpid()}_{request.node.name}"
    path = SHM / name
    path.write_bytes(np.arange(2 * ROWS * COLS, dtype=np.float32).tobytes())
    yield name
    path.unlink(missing_ok=True)


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ProcessPool]:
    config = {
        "backend": "python",
        "max_batch_size": 2 * ROWS,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [COLS]}],
        "outputs": [
            {"name": "OUTPUT0", "datatype": "FP32", "dims": [COLS]},
            {"name": "WRITABLE", "datatype": "BOOL", "dims": [1]},
        ],
        "execution": {"mode": "worker"},
    }
    write_model(tmp_path / "repo", "twice", config, {"model.py": MODEL.encode()})
    manager: ModelManager = await load_repository(tmp_path / "repo")
    try:
        pool = manager.get("twice").pool  # type: ignore[attr-defined]
        assert isinstance(pool, ProcessPool)
        yield pool
    finally:
        await manager.close()


def _input(regions: SharedMemoryRegistry, name: str, offset: int = 0) -> np.ndarray[Any, Any]:
    """INPUT0 decoded as the protocols decode it: a view of the server's mapping."""
    view = regions.read(SharedMemoryRef(name, NBYTES, offset), "INPUT0")
    data = tensor_from_buffer("INPUT0", "FP32", (ROWS, COLS), view).data
    assert isinstance(data, np.ndarray)
    return data


def _submit(pool: ProcessPool, *xs: np.ndarray[Any, Any]) -> asyncio.Future[BatchResult]:
    parts = [{"INPUT0": x} for x in xs]
    worker = pool.workers[0]
    return worker.submit_batch(parts, [ROWS] * len(xs), pool.hosts[0].config)  # type: ignore[attr-defined,no-any-return]


def _expected(offset: int = 0) -> np.ndarray[Any, Any]:
    start = offset // 4
    return np.arange(start, start + ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) * 2


def _worker_maps(pool: ProcessPool, key: str) -> bool:
    return f"/dev/shm/{key}" in Path(f"/proc/{pool.hosts[0].pid}/maps").read_text()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within 10s: {what}"
        await asyncio.sleep(0.02)


async def test_an_input_in_a_region_reaches_the_worker_without_a_copy(
    pool: ProcessPool, key: str
) -> None:
    host = pool.hosts[0]
    regions = SharedMemoryRegistry()
    regions.register_system("r", key, 0, 2 * NBYTES)
    try:
        for offset in (0, NBYTES, 4 * COLS):  # the first sends the descriptor, then reused
            future = _submit(pool, _input(regions, "r", offset))
            [job] = host._in_flight.values()
            assert job.input_offset is None
            assert host._inputs.used_bytes == 0  # nothing was copied into the arena
            [result] = (await future).outputs
            np.testing.assert_array_equal(result["OUTPUT0"], _expected(offset))
            assert not result["WRITABLE"].any()  # a read-only view of the worker's mapping
        assert len(host._regions.mapped) == 1
        assert _worker_maps(pool, key)
        # Several requests are concatenated (a copy, as before), and right.
        a, b = _input(regions, "r"), _input(regions, "r", NBYTES)
        [first, second] = (await _submit(pool, a, b)).outputs
        np.testing.assert_array_equal(first["OUTPUT0"], _expected())
        np.testing.assert_array_equal(second["OUTPUT0"], _expected(NBYTES))
        assert first["WRITABLE"].all()
    finally:
        regions.close()


async def test_a_key_recreated_after_registration_is_copied_not_reopened(
    pool: ProcessPool, key: str
) -> None:
    """The server reads the object it registered; handing the worker the one now under the
    key would give it other bytes, so the input is copied (the server's view) instead."""
    regions = SharedMemoryRegistry()
    regions.register_system("r", key, 0, 2 * NBYTES)
    try:
        other = SHM / f"{key}.new"
        other.write_bytes(bytes(2 * NBYTES))  # zeros
        other.rename(SHM / key)  # same key, another inode; the old one lives in our mapping
        future = _submit(pool, _input(regions, "r"))
        assert pool.hosts[0]._inputs.used_bytes > 0  # copied into the arena
        [result] = (await future).outputs
        np.testing.assert_array_equal(result["OUTPUT0"], _expected())
        assert not pool.hosts[0]._regions.mapped
    finally:
        regions.close()


async def test_unregister_forgets_and_a_restarted_worker_is_sent_the_region_again(
    pool: ProcessPool, key: str
) -> None:
    host = pool.hosts[0]
    regions = SharedMemoryRegistry()
    before = _fds()
    regions.register_system("r", key, 0, 2 * NBYTES)
    (await _submit(pool, _input(regions, "r")))
    assert _worker_maps(pool, key)
    regions.unregister("system", "r")
    await asyncio.sleep(0)  # the FORGET is sent from the loop (unregister may be elsewhere)
    assert not host._regions.mapped
    # A batch after the FORGET: once it is answered the worker has dropped the region.
    plain = np.ones((ROWS, COLS), np.float32)
    np.testing.assert_array_equal((await _submit(pool, plain)).outputs[0]["OUTPUT0"], plain * 2)
    assert not _worker_maps(pool, key)
    regions.register_system("r", key, 0, 2 * NBYTES)
    [result] = (await _submit(pool, _input(regions, "r"))).outputs
    np.testing.assert_array_equal(result["OUTPUT0"], _expected())
    assert _worker_maps(pool, key)
    # A new process has no regions: the next request sends the descriptor again.
    first = host.pid
    os.kill(first, signal.SIGKILL)
    await _wait(lambda: host.up and host.pid != first, "a new worker")
    assert not host._regions.mapped
    [result] = (await _submit(pool, _input(regions, "r", NBYTES))).outputs
    np.testing.assert_array_equal(result["OUTPUT0"], _expected(NBYTES))
    assert len(host._regions.mapped) == 1
    assert _worker_maps(pool, key)
    regions.close()
    await asyncio.sleep(0)
    assert _fds() == before  # every descriptor opened to send a region was closed


def test_locate_finds_views_of_a_registered_mapping_only(key: str) -> None:
    regions = SharedMemoryRegistry()
    regions.register_system("r", key, 64, NBYTES)
    x = _input(regions, "r")
    where = shm.locate(x)
    assert where is not None and where[1] == 64
    record = where[0]
    assert record.length == 64 + NBYTES
    # numpy collapses a view's base chain to the array over the memoryview
    assert isinstance(x[2:].base, np.ndarray) and isinstance(x[2:].base.base, memoryview)
    assert shm.locate(x[2:]) == (record, 64 + 2 * COLS * 4)
    assert shm.locate(x.reshape(-1)[COLS:]) == (record, 64 + COLS * 4)
    assert shm.locate(x.T) is None  # not contiguous
    assert shm.locate(x.copy()) is None
    assert shm.locate(np.frombuffer(b"\0" * 16, np.float32)) is None
    assert shm.locate(np.frombuffer(mmap.mmap(-1, 16), np.float32)) is None  # not registered
    assert shm.registered()
    regions.unregister("system", "r")
    assert shm.locate(x) is None  # still mapped (x views it) but no longer registered


def test_region_descriptors_and_frames_with_descriptors(tmp_path: Path) -> None:
    ref = TensorRef("INPUT0", "<f4", (2, 3), False, 64, 24, 7)
    refs, _ = unpack_refs(memoryview(pack_refs([ref, ref._replace(region=0)])))
    assert refs == [ref, ref._replace(region=0)]
    data = np.arange(32, dtype=np.float32).tobytes()
    path = tmp_path / "region"
    path.write_bytes(data)
    with path.open("rb") as f:
        mapping = mmap.mmap(f.fileno(), len(data), access=mmap.ACCESS_READ)
    [array] = read_arrays([ref], memoryview(b""), memoryview(b""), False, {7: mapping}).values()
    assert array.tolist() == [[16, 17, 18], [19, 20, 21]] and not array.flags.writeable
    with pytest.raises(ServerError, match="not mapped in the worker"):
        read_arrays([ref], memoryview(b""), memoryview(b""), False, {})
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs, path.open("rb") as f:
        frame = frame_bytes(Kind.REGION, 0, 0, REGION_BODY.pack(7, len(data)))
        socket.send_fds(ours, [frame + frame_bytes(Kind.FORGET, 0, 0, b"x")], [f.fileno()])
        reader = FrameReader(fds=True)
        frames = reader.read(theirs)
        assert frames is not None and [m.kind for m in frames] == [Kind.REGION, Kind.FORGET]
        assert reader.fds is not None and len(reader.fds) == 1
        fd = reader.fds.popleft()
        assert os.read(fd, 4) == data[:4]
        os.close(fd)


async def test_a_region_that_cannot_be_handed_on_is_copied(key: str) -> None:
    loop = asyncio.get_running_loop()
    sent: list[bytes] = []
    regions = SharedMemoryRegistry()
    regions.register_system("r", key, 0, NBYTES)
    x = {"INPUT0": _input(regions, "r")}
    record = shm.locate(x["INPUT0"])
    assert record is not None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        worker = WorkerRegions(loop, sent.append, sent.append)
        assert worker.find(x, None, False) == {}  # no process
        assert worker.find(x, ours, True) == {}  # bytes queued: the descriptor must wait
        assert worker.find(x, ours, False) == {"INPUT0": (record[0].id, 0)}
        assert worker.find(x, ours, False) == {"INPUT0": (record[0].id, 0)}  # sent once
        reader = FrameReader(fds=True)
        frames = reader.read(theirs)
        assert frames is not None and [f.kind for f in frames] == [Kind.REGION]
        assert reader.fds is not None and len(reader.fds) == 1
        os.close(reader.fds.popleft())
        worker.reset()
        (SHM / key).unlink()  # gone from /dev/shm: it cannot be opened again
        assert worker.find(x, ours, False) == {}
        assert worker.find(x, ours, False) == {}  # refused, not tried again
        worker.region_gone(record[0].id)
        await asyncio.sleep(0)
        assert sent == []  # this process never had it: no FORGET
    closed = asyncio.new_event_loop()
    closed.close()
    WorkerRegions(closed, sent.append, sent.append).region_gone(1)  # no loop: nothing to do
    regions.close()
