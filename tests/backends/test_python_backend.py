"""The Python backend: class discovery, isolation, hooks and config in-process; batching, error
propagation and unload-at-shutdown through the real server."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
import yaml
from conftest import RunningServer, running_server
from helpers import client_for
from tritonclient.utils import InferenceServerException

from kernelport.backends.python import PythonBackend, PythonInstance
from kernelport.core.backend import LoadContext
from kernelport.core.model_config import parse_model_config
from kernelport.errors import ServerError

IO = {
    "inputs": [{"name": "X", "datatype": "FP32", "dims": [4]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "dims": [4]}],
}

SCALE = '''
import numpy as np

class Scaler:
    """Y = X * factor; ROWS tells the test how many rows each execute() call saw."""

    def load(self, config):
        self.factor = float(config.parameters.get("factor", 2))

    def execute(self, inputs):
        x = inputs["X"]
        return {"Y": x * self.factor, "ROWS": np.full((len(x), 1), len(x), np.int32)}

    def preprocess(self, inputs):
        return {"X": inputs["X"] + 1}

    def postprocess(self, outputs):
        return {**outputs, "Y": -outputs["Y"]}
'''

RAISES = """
import numpy as np

class Model:
    def execute(self, inputs):
        if (inputs["X"] < 0).any():
            raise ValueError("negative input, refusing on purpose")
        return {"Y": inputs["X"]}
"""

UNLOAD = """
from pathlib import Path

class Model:
    def load(self, config):
        self.marker = Path(config.parameters["marker"])

    def execute(self, inputs):
        return {"Y": inputs["X"]}

    def unload(self):
        self.marker.write_text("unloaded")
"""

DECLARED = """
class Model:
    @staticmethod
    def config():
        return {
            "max_batch_size": 2,
            "inputs": [{"name": "A", "datatype": "INT32", "dims": [-1]}],
            "outputs": [{"name": "B", "datatype": "INT32", "dims": [-1]}],
        }

    def execute(self, inputs):
        return {"B": inputs["A"] * 3}
"""


def model_dir(repo: Path, name: str, source: str, config: dict[str, Any] | None = None,
              version: int = 1) -> Path:  # fmt: skip
    path = repo / name / str(version)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.py").write_text(textwrap.dedent(source))
    if config is not None:
        (repo / name / "model.yaml").write_text(yaml.safe_dump({"backend": "python", **config}))
    return path


def load(path: Path, raw: dict[str, Any], index: int = 0) -> PythonInstance:
    backend = PythonBackend()
    raw = backend.autocomplete({"name": path.parent.name, "backend": "python", **raw}, path)
    config = parse_model_config(raw, str(path))
    return backend.load(LoadContext(config, path, "cpu", index))


# --- in-process ----------------------------------------------------------------------------


ONE_CLASS = """
import numpy

class Helper:
    pass

class Mine:
    def execute(self, inputs):
        return inputs
"""

NAMED = """
class A:
    def execute(self, inputs):
        return inputs

class B(A):
    pass

Model = B
"""


def test_class_discovery(tmp_path: Path) -> None:
    instance = load(model_dir(tmp_path, "one", ONE_CLASS), dict(IO))
    assert type(instance._user).__name__ == "Mine"
    named = model_dir(tmp_path, "named", NAMED)
    assert type(load(named, dict(IO))._user).__name__ == "B"  # `Model` wins over the scan
    two = model_dir(tmp_path, "two", NAMED.replace("Model = B", ""))
    with pytest.raises(ServerError, match=r"expected one class with an execute.*found 2: A, B"):
        load(two, dict(IO))
    none = model_dir(tmp_path, "none", "from collections import OrderedDict\nx = 1\n")
    with pytest.raises(ServerError, match="found 0: none"):
        load(none, dict(IO))


def test_import_errors_name_the_file_and_line(tmp_path: Path) -> None:
    broken = model_dir(tmp_path, "broken", "import numpy\n\nvalue = undefined_name\n")
    with pytest.raises(ServerError, match=r"importing failed \(model.py line 3\): NameError"):
        load(broken, dict(IO))
    failing = model_dir(tmp_path, "failing", "class Model:\n    def load(self, config):\n"
                        "        raise OSError('no weights')\n"
                        "    def execute(self, i):\n        return i\n")  # fmt: skip
    with pytest.raises(ServerError, match=r"Model failed to load \(model.py line 3\): OSError"):
        load(failing, dict(IO))


def test_each_instance_and_version_gets_its_own_module(tmp_path: Path) -> None:
    source = "COUNT = []\nclass Model:\n    def execute(self, i):\n        COUNT.append(1)\n" \
             "        return {'Y': i['X'] * VERSION + len(COUNT) * 0}\n"  # fmt: skip
    v1 = model_dir(tmp_path, "m", "VERSION = 1\n" + source, version=1)
    v2 = model_dir(tmp_path, "m", "VERSION = 2\n" + source, version=2)
    path_before = list(sys.path)
    modules_before = set(sys.modules)
    a, b, c = load(v1, dict(IO), 0), load(v1, dict(IO), 1), load(v2, dict(IO), 0)
    x = {"X": np.ones((1, 4), np.float32)}
    assert a.execute(x)["Y"][0, 0] == 1 and c.execute(x)["Y"][0, 0] == 2
    a.execute(x)
    names = {a._module.__name__, b._module.__name__, c._module.__name__}
    assert len(names) == 3 and names <= set(sys.modules)
    assert len(a._module.COUNT) == 2 and len(b._module.COUNT) == 0  # no shared module state
    assert sys.path == path_before
    for instance in (a, b, c):
        instance.unload()
    assert set(sys.modules) == modules_before
    assert not list(v1.glob("__pycache__")), "no bytecode written into the model repository"


def test_hooks_appear_only_when_defined(tmp_path: Path) -> None:
    config = {**IO, "max_batch_size": 4}
    config["outputs"] = [*IO["outputs"], {"name": "ROWS", "datatype": "INT32", "dims": [1]}]
    hooked = load(model_dir(tmp_path, "scale", SCALE), config)
    x = {"X": np.ones((2, 4), np.float32)}
    pre = hooked.preprocess(x)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(pre["X"], np.full((2, 4), 2))
    out = hooked.postprocess(hooked.execute(pre))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(out["Y"], np.full((2, 4), -4))
    plain = load(model_dir(tmp_path, "plain", RAISES), dict(IO))
    assert not hasattr(plain, "preprocess") and not hasattr(plain, "postprocess")


def test_hook_errors_name_the_model_and_hook(tmp_path: Path) -> None:
    source = SCALE.replace('return {"X": inputs["X"] + 1}', "raise KeyError('Z')")
    config = {**IO, "outputs": [*IO["outputs"], {"name": "ROWS", "datatype": "INT32", "dims": [1]}]}
    instance = load(model_dir(tmp_path, "hooky", source), config)
    with pytest.raises(ServerError, match="model 'hooky' preprocess failed: KeyError: 'Z'"):
        instance.preprocess({"X": np.ones((1, 4), np.float32)})  # type: ignore[attr-defined]


def test_execute_results_are_checked(tmp_path: Path) -> None:
    source = "class Model:\n    def execute(self, i):\n        return RESULT\n"
    wrong_type = load(model_dir(tmp_path, "t", "RESULT = [1]\n" + source), dict(IO))
    with pytest.raises(
        TypeError, match="must return a dict of output name -> numpy array, got list"
    ):
        wrong_type.execute({"X": np.ones((1, 4), np.float32)})
    rows = "import numpy as np\nRESULT = {'Y': np.ones((3, 4))}\n" + source
    wrong_rows = load(model_dir(tmp_path, "r", rows), {**IO, "max_batch_size": 4})
    with pytest.raises(ValueError, match=r"output 'Y' with shape \[3, 4\], but the batch has 2"):
        wrong_rows.execute({"X": np.ones((2, 4), np.float32)})


def test_config_from_the_class(tmp_path: Path) -> None:
    path = model_dir(tmp_path, "declared", DECLARED)
    raw = PythonBackend().autocomplete({"name": "declared", "backend": "python"}, path)
    assert raw["max_batch_size"] == 2 and raw["inputs"][0]["name"] == "A"
    kept = PythonBackend().autocomplete({"name": "declared", "max_batch_size": 0}, path)
    assert kept["max_batch_size"] == 0  # model.yaml wins
    bare = model_dir(tmp_path, "bare", RAISES)
    with pytest.raises(ServerError, match=r"list inputs and outputs in model\.yaml, or give class"):
        PythonBackend().autocomplete({"name": "bare"}, bare)


# --- through the server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("python_repo")
    model_dir(repo, "scale", SCALE, {
        **IO, "max_batch_size": 8, "parameters": {"factor": 3},
        "outputs": [*IO["outputs"], {"name": "ROWS", "datatype": "INT32", "dims": [1]}],
        "dynamic_batching": {"max_queue_delay_us": 200_000, "preferred_batch_sizes": [8]},
    })  # fmt: skip
    model_dir(repo, "raises", RAISES, {**IO, "max_batch_size": 4})
    model_dir(repo, "declared", DECLARED)  # no model.yaml at all: backend from model.py
    model_dir(repo, "broken", "raise RuntimeError('cannot import me')\n", dict(IO))
    with running_server(repo, repo, wait_for="live") as server:
        yield server


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    c = client_for(request.param, server)
    yield c
    c.close()


def infer(client: Any, model: str, name: str, array: np.ndarray, dtype: str = "FP32") -> Any:
    mod = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    item = mod.InferInput(name, list(array.shape), dtype)
    item.set_data_from_numpy(array)
    return client.infer(model, [item])


def test_batch_request(client: Any) -> None:
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    result = infer(client, "scale", "X", x)
    # preprocess adds 1 per request, execute scales the batch by the `factor` parameter,
    # postprocess negates per request.
    np.testing.assert_array_equal(result.as_numpy("Y"), -(x + 1) * 3)
    np.testing.assert_array_equal(result.as_numpy("ROWS"), np.full((5, 1), 5))


async def test_concurrent_requests_reach_execute_as_one_batch(server: RunningServer) -> None:
    client = grpc_aio.InferenceServerClient(server.grpc_url)
    try:

        async def one(i: int) -> Any:
            item = grpc_aio.InferInput("X", [1, 4], "FP32")
            item.set_data_from_numpy(np.full((1, 4), i, np.float32))
            return await client.infer("scale", [item])

        results = await asyncio.gather(*(one(i) for i in range(8)))
    finally:
        await client.close()
    rows_seen = [int(r.as_numpy("ROWS")[0, 0]) for r in results]
    assert max(rows_seen) > 1, f"each request ran alone: {rows_seen}"
    for i, result in enumerate(results):  # hooks ran per request around the shared batch
        np.testing.assert_array_equal(result.as_numpy("Y"), np.full((1, 4), -(i + 1) * 3))


def test_config_declared_by_the_class(client: Any) -> None:
    result = infer(client, "declared", "A", np.array([[1, 2, 3]], np.int32), "INT32")
    np.testing.assert_array_equal(result.as_numpy("B"), [[3, 6, 9]])


def test_hook_errors_reach_the_client(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    source = SCALE.replace('return {**outputs, "Y": -outputs["Y"]}', "raise RuntimeError('broke')")
    rows = {"name": "ROWS", "datatype": "INT32", "dims": [1]}
    model_dir(repo, "post", source, {**IO, "outputs": [*IO["outputs"], rows]})
    with running_server(tmp_path, repo, wait_for="ready") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            with pytest.raises(InferenceServerException, match="model 'post' postprocess failed"):
                infer(client, "post", "X", np.ones(4, np.float32))
            assert client.is_server_live()
        finally:
            client.close()


def test_user_errors_reach_the_client_and_the_server_keeps_serving(client: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, "raises", "X", -np.ones((1, 4), np.float32))
    message = str(info.value)
    assert "model 'raises'" in message
    assert "ValueError: negative input, refusing on purpose" in message
    result = infer(client, "raises", "X", np.ones((2, 4), np.float32))
    np.testing.assert_array_equal(result.as_numpy("Y"), np.ones((2, 4)))
    assert client.is_server_live()


def test_an_import_error_only_takes_down_its_model(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert client.is_model_ready("scale") and not client.is_model_ready("broken")
    finally:
        client.close()
    assert "RuntimeError: cannot import me" in index["broken"]["reason"]
    assert "model.py line 1" in index["broken"]["reason"]


def test_unload_runs_on_shutdown(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    marker = tmp_path / "unloaded.txt"
    model_dir(repo, "closing", UNLOAD, {**IO, "parameters": {"marker": str(marker)}})
    with running_server(tmp_path, repo, wait_for="ready") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        result = infer(client, "closing", "X", np.ones(4, np.float32))
        client.close()
        np.testing.assert_array_equal(result.as_numpy("Y"), np.ones(4))
        assert not marker.exists()
        assert server.stop() == 0  # SIGTERM: a clean shutdown unloads every model
    assert marker.read_text() == "unloaded"
