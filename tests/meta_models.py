"""A repository of meta models and Triton Python-backend models, for the in-process tests
(tests/core/test_meta.py) and the tritonclient ones (tests/e2e/test_meta_models.py).

- ``add_one`` (ONNX, +1) and ``scale`` (Python, x2; batches of 2 cut only when full, after
  up to 10 s: two requests arriving together are one batch, whoever sent them)
- ``combo`` (async meta model): A = scale(X), B = add_one(X), called concurrently
- ``combo_sync``: the same from a plain execute with ``models.infer_sync``
- ``secret`` (hidden, x3) and ``uses_secret`` (calls it)
- ``wrong`` gives ``add_one`` an input it does not have (INVALID_ARGUMENT)
- ``strict`` declares ``add_one`` but calls ``scale``; ``on_loop`` calls infer_sync on the loop
- ``bls`` (Triton, config.pbtxt): preprocess (x10) then a BLS call to ``add_one``
- ``bls_async``: the same with ``await ... async_exec()``
- ``words`` (Triton, decoupled): one response per word, from a thread of the model's own
- ``picky`` (Triton): fails requests whose input is negative, alone (batched with others)
"""

from __future__ import annotations

from pathlib import Path

from helpers import onnx_add, write_model

FP32_4 = [{"datatype": "FP32", "dims": [4]}]


def _tensors(*names: str) -> list[dict[str, object]]:
    return [{"name": n, "datatype": "FP32", "dims": [4]} for n in names]


SCALE = """
class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"] * 2}
"""

SECRET = """
class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"] * 3}
"""

COMBO = """
import asyncio

class Model:
    async def execute(self, inputs):
        x = inputs["X"]
        a, b = await asyncio.gather(
            self.models.infer("scale", {"INPUT0": x}),
            self.models.infer("add_one", {"INPUT0": x}),
        )
        return {"A": a["OUTPUT0"], "B": b["OUTPUT0"]}
"""

COMBO_SYNC = """
class Model:
    def load(self, config):
        self.loaded_with = sorted(self.models.allowed)

    def execute(self, inputs):
        x = inputs["X"]
        a = self.models.infer_sync("scale", {"INPUT0": x})
        b = self.models.infer_sync("add_one", {"INPUT0": x}, outputs=["OUTPUT0"])
        return {"A": a["OUTPUT0"], "B": b["OUTPUT0"]}
"""

USES_SECRET = """
class Model:
    async def execute(self, inputs):
        out = await self.models.infer("secret", {"INPUT0": inputs["X"]})
        return {"A": out["OUTPUT0"]}
"""

STRICT = """
class Model:
    async def execute(self, inputs):
        out = await self.models.infer("scale", {"INPUT0": inputs["X"]})
        return {"A": out["OUTPUT0"]}
"""

WRONG_INPUT = """
class Model:
    async def execute(self, inputs):
        out = await self.models.infer("add_one", {"WRONG": inputs["X"]})
        return {"A": out["OUTPUT0"]}
"""

ON_LOOP = """
import asyncio

class Model:
    async def execute(self, inputs):
        out = self.models.infer_sync("add_one", {"INPUT0": inputs["X"]})
        return {"A": out["OUTPUT0"]}
"""

BLS_PBTXT = """
backend: "python"
max_batch_size: 8
input [ { name: "RAW" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
"""

# Written as Triton's Python backend documentation writes models.
BLS = """
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        out = pb_utils.get_output_config_by_name(self.model_config, "OUT")
        self.out_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        self.name = args["model_name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "RAW").as_numpy()
            scaled = pb_utils.Tensor("INPUT0", (raw * 10).astype(np.float32))
            bls = pb_utils.InferenceRequest(
                model_name="add_one", requested_output_names=["OUTPUT0"], inputs=[scaled]
            )
            answer = bls.exec()
            if answer.has_error():
                raise pb_utils.TritonModelException(answer.error().message())
            out = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUT", out.astype(self.out_dtype))]
                )
            )
        return responses

    def finalize(self):
        pass
"""

BLS_ASYNC = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "RAW").as_numpy()
            bls = pb_utils.InferenceRequest(
                model_name="add_one",
                requested_output_names=["OUTPUT0"],
                inputs=[pb_utils.Tensor("INPUT0", raw * 10)],
            )
            answer = await bls.async_exec()
            if answer.has_error():
                responses.append(pb_utils.InferenceResponse(error=answer.error()))
                continue
            out = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out.as_numpy())]))
        return responses
"""

WORDS_PBTXT = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "WORD" data_type: TYPE_STRING dims: [ 1 ] } ]
"""

WORDS = """
import threading
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()[0].decode()
            sender = request.get_response_sender()
            threading.Thread(target=self._send, args=(text, sender)).start()
        return None

    def _send(self, text, sender):
        for word in text.split():
            if word == "boom":
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("no bombs", pb_utils.TritonError.INVALID_ARG)))
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            word_tensor = pb_utils.Tensor("WORD", np.array([word.encode()], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[word_tensor]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""

PICKY_PBTXT = """
backend: "python"
max_batch_size: 2
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 10000000 }
"""

PICKY = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if (x < 0).any():
                error = pb_utils.TritonError("negative input", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return responses
"""


def _meta(calls: list[str], outputs: tuple[str, ...], **extra: object) -> dict[str, object]:
    return {
        "backend": "python",
        "max_batch_size": 8,
        "inputs": _tensors("X"),
        "outputs": _tensors(*outputs),
        "calls": calls,
        **extra,
    }


def _pbtxt(repo: Path, name: str, pbtxt: str, source: str) -> None:
    write_model(repo, name, None, {"model.py": source.encode()})
    (repo / name / "config.pbtxt").write_text(pbtxt)


def write_meta_repository(repo: Path) -> Path:
    add = {
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "inputs": _tensors("INPUT0"),
        "outputs": _tensors("OUTPUT0"),
        "dynamic_batching": {},
    }
    write_model(repo, "add_one", add, {"model.onnx": onnx_add(1.0)})
    scale = {
        "backend": "python",
        "max_batch_size": 2,
        "inputs": _tensors("INPUT0"),
        "outputs": _tensors("OUTPUT0"),
        "dynamic_batching": {"max_queue_delay_us": 10_000_000},
    }
    write_model(repo, "scale", scale, {"model.py": SCALE.encode()})
    secret = {**scale, "dynamic_batching": {}, "hidden": True}
    write_model(repo, "secret", secret, {"model.py": SECRET.encode()})
    both = ["scale", "add_one"]
    write_model(repo, "combo", _meta(both, ("A", "B")), {"model.py": COMBO.encode()})
    write_model(repo, "combo_sync", _meta(both, ("A", "B")), {"model.py": COMBO_SYNC.encode()})
    write_model(repo, "uses_secret", _meta(["secret"], ("A",)), {"model.py": USES_SECRET.encode()})
    write_model(repo, "strict", _meta(["add_one"], ("A",)), {"model.py": STRICT.encode()})
    write_model(repo, "wrong", _meta(["add_one"], ("A",)), {"model.py": WRONG_INPUT.encode()})
    write_model(repo, "on_loop", _meta(["add_one"], ("A",)), {"model.py": ON_LOOP.encode()})
    _pbtxt(repo, "bls", BLS_PBTXT, BLS)
    _pbtxt(repo, "bls_async", BLS_PBTXT, BLS_ASYNC)
    _pbtxt(repo, "words", WORDS_PBTXT, WORDS)
    _pbtxt(repo, "picky", PICKY_PBTXT, PICKY)
    return repo
