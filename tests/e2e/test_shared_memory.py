"""The system (and, without a GPU, CUDA) shared-memory extensions against the real server.

Regions are created with tritonclient's own ``tritonclient.utils.shared_memory``, registered
and used through tritonclient's HTTP and gRPC clients, and perf_analyzer's ``--shared-memory
system`` runs against the server; every answer is compared with the same request sent without
shared memory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from conftest import RunningServer, running_server
from helpers import write_model
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from kernelport.config import Config, demo_repository
from kernelport.server import Server

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = ROOT / "scripts" / "perf_analyzer"
PA_VENV = Path(os.environ.get("PA_VENV", ROOT / ".venv-pa"))
CLIENTS = {"http": httpclient, "grpc": grpcclient}

_names = itertools.count()


#: what perf_analyzer is given for the `check` model, which fails any other input
CHECKED = np.arange(16, dtype=np.float32) * 0.5
CHECK_MODEL = f"""
import numpy as np

EXPECTED = np.array({CHECKED.tolist()!r}, np.float32)


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        if x.shape[1:] != EXPECTED.shape or not (x == EXPECTED).all():
            raise ValueError(f"INPUT0 is not what the client wrote: {{x.ravel()[:4].tolist()}}")
        return {{"OUTPUT0": x * 2}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Its own server: the module checks the mappings of its process. The demo models and
    # `check`.
    extra = tmp_path_factory.mktemp("shm_models")
    config = {
        "backend": "python",
        "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [16]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [16]}],
    }
    write_model(extra, "check", config, {"model.py": CHECK_MODEL.encode()})
    repos = ("--model-repository", str(demo_repository()), "--model-repository", str(extra))
    with running_server(tmp_path_factory.mktemp("shm"), None, *repos, wait_for="ready") as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    module = CLIENTS[request.param]
    url = server.http_url if request.param == "http" else server.grpc_url
    c = module.InferenceServerClient(url)
    c.module = module
    yield c
    c.unregister_system_shared_memory()
    c.close()


Region = Callable[[int], tuple[str, str, Any]]


@pytest.fixture
def region() -> Iterator[Region]:
    """Makes client regions (name, key, handle) of a given size; destroys them afterwards."""
    handles = []

    def make(size: int) -> tuple[str, str, Any]:
        name = f"kp_{os.getpid()}_{next(_names)}"
        handle = shm.create_shared_memory_region(name, "/" + name, size)
        handles.append(handle)
        return name, "/" + name, handle

    yield make
    for handle in handles:
        shm.destroy_shared_memory_region(handle)


def _input(module: ModuleType, name: str, array: np.ndarray[Any, Any], datatype: str) -> Any:
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _shm_input(module: ModuleType, name: str, shape: list[int], datatype: str, *where: Any) -> Any:
    tensor = module.InferInput(name, shape, datatype)
    tensor.set_shared_memory(*where)
    return tensor


def _shm_output(module: ModuleType, name: str, *where: Any) -> Any:
    out = module.InferRequestedOutput(name)
    out.set_shared_memory(*where)
    return out


def _fails(call: Callable[[], Any]) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.message())


def test_simple_inputs_and_outputs_in_shared_memory(client: Any, region: Region) -> None:
    m = client.module
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    expected = client.infer(
        "simple", [_input(m, "INPUT0", a, "INT32"), _input(m, "INPUT1", b, "INT32")]
    )
    in_name, in_key, in_handle = region(128)
    out_name, out_key, out_handle = region(192)
    shm.set_shared_memory_region(in_handle, [a, b])
    client.register_system_shared_memory(in_name, in_key, 128)
    client.register_system_shared_memory(out_name, out_key, 192)
    inputs = [
        _shm_input(m, "INPUT0", [1, 16], "INT32", in_name, 64),
        _shm_input(m, "INPUT1", [1, 16], "INT32", in_name, 64, 64),
    ]
    outputs = [
        _shm_output(m, "OUTPUT0", out_name, 64),
        _shm_output(m, "OUTPUT1", out_name, 64, 128),
    ]
    result = client.infer("simple", inputs, outputs=outputs)
    for name, offset in (("OUTPUT0", 0), ("OUTPUT1", 128)):
        got = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=offset)
        assert np.array_equal(got, expected.as_numpy(name))
        meta = result.get_output(name)
        if m is httpclient:  # metadata only: no data, no parameters (the C++ client's rule)
            assert meta == {"name": name, "datatype": "INT32", "shape": [1, 16]}
        else:
            assert (meta.datatype, list(meta.shape)) == ("INT32", [1, 16])
            assert meta.parameters["shared_memory_region"].string_param == out_name
    if m is grpcclient:  # one empty raw entry per shm output keeps the C++ client's indexing
        assert list(result.get_response().raw_output_contents) == [b"", b""]


def test_one_input_in_shared_memory_one_sent(client: Any, region: Region) -> None:
    """gRPC: the raw contents belong to the inputs not in shm; HTTP: shm beside binary."""
    m = client.module
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 7, dtype=np.int32)
    name, key, handle = region(64)
    shm.set_shared_memory_region(handle, [b])
    client.register_system_shared_memory(name, key, 64)
    for first_in_shm in (True, False):
        sent = _input(m, "INPUT1" if first_in_shm else "INPUT0", a, "INT32")
        in_shm = _shm_input(m, "INPUT0" if first_in_shm else "INPUT1", [1, 16], "INT32", name, 64)
        result = client.infer("simple", [in_shm, sent] if first_in_shm else [sent, in_shm])
        expected = b - a if first_in_shm else a - b
        assert np.array_equal(result.as_numpy("OUTPUT1"), expected)


def test_mixed_sources_on_the_mlp(client: Any, region: Region) -> None:
    """A batch of 3 from shared memory, its output returned normally, and the reverse."""
    m = client.module
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    expected = client.infer("mlp", [_input(m, "INPUT0", x, "FP32")]).as_numpy("OUTPUT0")
    name, key, handle = region(x.nbytes + 100)
    shm.set_shared_memory_region(handle, [x], offset=100)
    client.register_system_shared_memory(name, key, x.nbytes + 100)
    from_shm = _shm_input(m, "INPUT0", [3, 64], "FP32", name, x.nbytes, 100)
    got = client.infer("mlp", [from_shm]).as_numpy("OUTPUT0")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    out_name, out_key, out_handle = region(x.nbytes)
    client.register_system_shared_memory(out_name, out_key, x.nbytes)
    client.infer(
        "mlp",
        [_input(m, "INPUT0", x, "FP32")],
        outputs=[_shm_output(m, "OUTPUT0", out_name, x.nbytes)],
    )
    written = shm.get_contents_as_numpy(out_handle, np.float32, [3, 64])
    np.testing.assert_allclose(written, expected, rtol=1e-6)


def test_bytes_tensors_in_shared_memory(client: Any, region: Region) -> None:
    m = client.module
    a = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    b = np.array([[b"1"] * 16], dtype=np.object_)
    expected = client.infer(
        "simple_string", [_input(m, "INPUT0", a, "BYTES"), _input(m, "INPUT1", b, "BYTES")]
    )
    sa, sb = serialize_byte_tensor(a), serialize_byte_tensor(b)  # 0-d arrays holding bytes
    size_a, size_b = len(sa.item()), len(sb.item())
    name, key, handle = region(size_a + size_b)
    shm.set_shared_memory_region(handle, [sa, sb])
    client.register_system_shared_memory(name, key, size_a + size_b)
    out_name, out_key, out_handle = region(1024)
    client.register_system_shared_memory(out_name, out_key, 1024)
    inputs = [
        _shm_input(m, "INPUT0", [1, 16], "BYTES", name, size_a),
        _shm_input(m, "INPUT1", [1, 16], "BYTES", name, size_b, size_a),
    ]
    result = client.infer(
        "simple_string", inputs, outputs=[_shm_output(m, "OUTPUT0", out_name, 1024)]
    )
    assert result.get_output("OUTPUT0") is not None
    got = shm.get_contents_as_numpy(out_handle, np.object_, [1, 16])
    assert got.tolist() == expected.as_numpy("OUTPUT0").tolist()


def test_status_and_unregister(client: Any, region: Region) -> None:
    a, a_key, _ = region(64)
    b, b_key, _ = region(4096)
    client.register_system_shared_memory(a, a_key, 64)
    client.register_system_shared_memory(b, b_key, 100, offset=4)
    message = _fails(lambda: client.register_system_shared_memory(a, b_key, 8))
    assert message == f"shared memory region '{a}' already in manager"
    status = client.get_system_shared_memory_status()
    if client.module is grpcclient:
        status = [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in status.regions.values()
        ]
    assert sorted(status, key=lambda r: r["name"]) == [
        {"name": a, "key": a_key, "offset": 0, "byte_size": 64},
        {"name": b, "key": b_key, "offset": 4, "byte_size": 100},
    ]
    client.unregister_system_shared_memory(a)
    message = _fails(lambda: client.get_system_shared_memory_status(a))
    assert message == f"Unable to find system shared memory region: '{a}'"
    message = _fails(lambda: client.unregister_system_shared_memory(a))
    assert message == f"Unable to find system shared memory region: '{a}'"
    client.unregister_system_shared_memory()
    empty = client.get_system_shared_memory_status()
    assert (len(empty.regions) if client.module is grpcclient else len(empty)) == 0
    # Without a GPU: CUDA status is empty, unregister-all succeeds, register says why not.
    cuda = client.get_cuda_shared_memory_status()
    assert (len(cuda.regions) if client.module is grpcclient else len(cuda)) == 0
    client.unregister_cuda_shared_memory()
    metadata = client.get_server_metadata()
    extensions = metadata.extensions if client.module is grpcclient else metadata["extensions"]
    assert "system_shared_memory" in extensions


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has a GPU")
def test_cuda_register_without_a_device(client: Any) -> None:
    message = _fails(lambda: client.register_cuda_shared_memory("g", b"AAAA" * 22, 0, 64))
    assert message.startswith("CUDA shared memory is not available: ")
    metadata = client.get_server_metadata()
    extensions = metadata.extensions if client.module is grpcclient else metadata["extensions"]
    assert "cuda_shared_memory" not in extensions


def test_bad_requests_get_clear_errors(client: Any, region: Region) -> None:
    m = client.module
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    name, key, handle = region(128)
    shm.set_shared_memory_region(handle, [a, a])
    client.register_system_shared_memory(name, key, 128)
    small, small_key, _ = region(32)
    client.register_system_shared_memory(small, small_key, 32)

    def infer(in0: Any, outputs: list[Any] | None = None) -> Callable[[], Any]:
        in1 = _shm_input(m, "INPUT1", [1, 16], "INT32", name, 64, 64)
        return lambda: client.infer("simple", [in0, in1], outputs=outputs)

    cases = {
        "unknown region": (
            infer(_shm_input(m, "INPUT0", [1, 16], "INT32", "nope", 64)),
            "input 'INPUT0': Unable to find shared memory region: 'nope'",
        ),
        "out of bounds": (
            infer(_shm_input(m, "INPUT0", [1, 16], "INT32", name, 64, 96)),
            f"input 'INPUT0': offset 96 + byte_size 64 exceeds shared memory region '{name}' "
            "of 128 bytes",
        ),
        "wrong byte size": (
            infer(_shm_input(m, "INPUT0", [1, 16], "INT32", name, 32)),
            "input 'INPUT0': INT32 shape [1, 16] needs 64 bytes, got 32",
        ),
        "output region too small": (
            infer(
                _shm_input(m, "INPUT0", [1, 16], "INT32", name, 64),
                [_shm_output(m, "OUTPUT0", small, 32)],
            ),
            f"output 'OUTPUT0' needs 64 bytes but shared memory region '{small}' provides 32",
        ),
    }
    for what, (call, expected) in cases.items():
        assert _fails(call).startswith(expected), what
    bad_keys = {
        "../x": "shared memory key '../x' must be printable, without '/' or '..'",
        "/kp_missing_key": "Unable to open shared memory region: '/kp_missing_key'",
    }
    register = client.register_system_shared_memory
    for bad_key, expected in bad_keys.items():
        assert _fails(lambda k=bad_key: register("r", k, 8)).startswith(expected)
    # The server keeps serving, and a good request right after gets the right answer.
    good = infer(_shm_input(m, "INPUT0", [1, 16], "INT32", name, 64))()
    assert np.array_equal(good.as_numpy("OUTPUT0"), a + a)


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_server_unmaps_and_never_unlinks(tmp_path: Path, region: Region) -> None:
    name, key, handle = region(64)
    with running_server(tmp_path, None, wait_for="ready") as running:
        client = httpclient.InferenceServerClient(running.http_url)
        client.register_system_shared_memory(name, key, 64)
        assert f"/dev/shm/{name}" in _maps(running.python_pid)
        client.unregister_system_shared_memory(name)
        assert f"/dev/shm/{name}" not in _maps(running.python_pid)
        client.register_system_shared_memory(name, key, 64)
        client.close()
        assert running.stop() == 0
    assert (Path("/dev/shm") / name).exists()  # still the client's
    shm.set_shared_memory_region(handle, [np.ones(16, np.float32)])


async def test_shutdown_closes_every_mapping(tmp_path: Path) -> None:
    # A client segment this process never maps itself, so the maps show only the server's.
    name = f"kp_{os.getpid()}_{next(_names)}"
    segment = Path("/dev/shm") / name
    segment.write_bytes(bytes(64))
    config = Config(
        model_repository=(tmp_path,), host="127.0.0.1", http_port=0, grpc_port=0, metrics_port=0
    )
    server = Server(config)
    await server.startup()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/v2/systemsharedmemory/region/{name}/register",
            data=f'{{"key": "/{name}", "byte_size": 64}}'.encode(),
        )
        status = await asyncio.to_thread(lambda: urllib.request.urlopen(request).status)
        assert status == 200
        assert str(segment) in _maps(os.getpid())
    finally:
        await server.shutdown()
    try:
        assert str(segment) not in _maps(os.getpid())
        assert segment.exists()
    finally:
        segment.unlink()


# --- perf_analyzer --------------------------------------------------------------------------


def _perf_analyzer(
    server: RunningServer, protocol: str, model: str, *args: str
) -> subprocess.Popen[str]:
    if not (PA_VENV / "bin" / "perf_analyzer").exists():
        if os.environ.get("KERNELPORT_REQUIRE_PERF_ANALYZER") == "1":
            pytest.fail("perf_analyzer is not installed: run scripts/setup_perf_analyzer.sh")
        pytest.skip("perf_analyzer not installed (scripts/setup_perf_analyzer.sh)")
    url = server.http_url if protocol == "http" else server.grpc_url
    # count_windows, never --request-count (a perf_analyzer race there can hang).
    return subprocess.Popen(
        [
            str(PERF_ANALYZER), "-m", model, "-i", protocol, "-u", url,
            "--measurement-mode", "count_windows", "--measurement-request-count", "100",
            "--stability-percentage", "999", *args,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _input_data(path: Path, x: np.ndarray[Any, Any], expected: Any = None) -> str:
    data: dict[str, Any] = {"data": [{"INPUT0": {"content": x.tolist(), "shape": [x.size]}}]}
    if expected is not None:
        data["validation_data"] = [{"OUTPUT0": {"content": expected.ravel().tolist(),
                                                "shape": [expected.size]}}]  # fmt: skip
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_gives_the_same_answers_with_system_shared_memory(
    server: RunningServer, protocol: str, tmp_path: Path
) -> None:
    """Its inputs: `check` fails any request whose INPUT0 is not the data perf_analyzer was
    given, so a run over shared memory with no error shows the server read what it wrote.
    Its outputs: perf_analyzer validates outputs only when they come in the response (over
    shared memory it reports "Output size doesn't match expected size" against Triton as
    well), so the answers tritonclient got through regions are checked by a run without."""
    good = _input_data(tmp_path / "good.json", CHECKED)
    process = _perf_analyzer(server, protocol, "check", "--shared-memory", "system",
                             "--input-data", good)  # fmt: skip
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert "error" not in out.lower().replace("std error", ""), out
    # The check can fail: other data is refused, with the model's message.
    wrong = _input_data(tmp_path / "wrong.json", CHECKED + 1)
    process = _perf_analyzer(server, protocol, "check", "--shared-memory", "system",
                             "--input-data", wrong)  # fmt: skip
    out, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "INPUT0 is not what the client wrote" in out, out

    # The answer through client regions (tritonclient's utilities) ...
    module = CLIENTS[protocol]
    client = module.InferenceServerClient(
        server.http_url if protocol == "http" else server.grpc_url
    )
    name = f"kp_{os.getpid()}_{next(_names)}"
    handle = shm.create_shared_memory_region(name, "/" + name, 2 * CHECKED.nbytes)
    try:
        shm.set_shared_memory_region(handle, [CHECKED.reshape(1, 16)])
        client.register_system_shared_memory(name, "/" + name, 2 * CHECKED.nbytes)
        infer_input = module.InferInput("INPUT0", [1, 16], "FP32")
        infer_input.set_shared_memory(name, CHECKED.nbytes)
        output = module.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory(name, CHECKED.nbytes, offset=CHECKED.nbytes)
        client.infer("check", [infer_input], outputs=[output])
        through_regions = shm.get_contents_as_numpy(handle, np.float32, [1, 16], CHECKED.nbytes)
        through_regions = through_regions.copy()
    finally:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)
        client.close()
    # ... is the one perf_analyzer validates without them.
    validated = _input_data(tmp_path / "validated.json", CHECKED, through_regions)
    process = _perf_analyzer(server, protocol, "check", "--input-data", validated)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    wrong = _input_data(tmp_path / "wrong_answer.json", CHECKED, through_regions + 1)
    process = _perf_analyzer(server, protocol, "check", "--input-data", wrong)
    out, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "Output doesn't match expected output" in out, out


def _regions(server: RunningServer) -> list[Any]:
    url = f"http://{server.http_url}/v2/systemsharedmemory/status"
    with urllib.request.urlopen(url) as response:
        return list(json.loads(response.read()))


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_with_system_shared_memory(server: RunningServer, protocol: str) -> None:
    before = set(os.listdir("/dev/shm"))
    process = _perf_analyzer(server, protocol, "mlp", "--shared-memory", "system")
    # perf_analyzer's regions appear on the server while it runs (it used shared memory).
    seen: list[Any] = []
    deadline = time.monotonic() + 60
    while not seen and process.poll() is None and time.monotonic() < deadline:
        seen = _regions(server)
        if not seen:
            time.sleep(0.01)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert "error" not in out.lower().replace("std error", ""), out
    assert seen and all(r["key"] == "/" + r["name"] for r in seen), out
    assert _regions(server) == []  # it unregistered them all at exit
    leftovers = {n for n in set(os.listdir("/dev/shm")) - before if "INPUT0" in n or "OUTPUT0" in n}
    assert not leftovers


# --- CUDA shared memory (only where a GPU exists) -------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not Path("/dev/nvidia0").exists(), reason="needs a CUDA device")
def test_cuda_shared_memory_inputs_and_outputs(client: Any) -> None:
    cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")
    m = client.module
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    expected = client.infer(
        "simple", [_input(m, "INPUT0", a, "INT32"), _input(m, "INPUT1", b, "INT32")]
    )
    tag = f"{os.getpid()}_{next(_names)}"
    cuda_in = cudashm.create_shared_memory_region(f"in_{tag}", 128, 0)
    cuda_out = cudashm.create_shared_memory_region(f"out_{tag}", 128, 0)
    try:
        cudashm.set_shared_memory_region(cuda_in, [a, b])
        for region_name, handle in ((f"in_{tag}", cuda_in), (f"out_{tag}", cuda_out)):
            client.register_cuda_shared_memory(region_name, cudashm.get_raw_handle(handle), 0, 128)
        status = client.get_cuda_shared_memory_status()
        count = len(status.regions) if m is grpcclient else len(status)
        assert count == 2
        inputs = [
            _shm_input(m, "INPUT0", [1, 16], "INT32", f"in_{tag}", 64),
            _shm_input(m, "INPUT1", [1, 16], "INT32", f"in_{tag}", 64, 64),
        ]
        outputs = [
            _shm_output(m, "OUTPUT0", f"out_{tag}", 64),
            _shm_output(m, "OUTPUT1", f"out_{tag}", 64, 64),
        ]
        client.infer("simple", inputs, outputs=outputs)
        both = cudashm.get_contents_as_numpy(cuda_out, np.int32, [2, 16])
        assert np.array_equal(both[0], expected.as_numpy("OUTPUT0")[0])
        assert np.array_equal(both[1], expected.as_numpy("OUTPUT1")[0])
        extensions = client.get_server_metadata()
        names = extensions.extensions if m is grpcclient else extensions["extensions"]
        assert "cuda_shared_memory" in names
    finally:
        client.unregister_cuda_shared_memory()
        cudashm.destroy_shared_memory_region(cuda_in)
        cudashm.destroy_shared_memory_region(cuda_out)
