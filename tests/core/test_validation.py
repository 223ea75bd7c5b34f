"""``validate_inputs`` and ``requested_outputs`` against a model's config, through the
``Signature`` they read it by: every check, and a signature that follows ``model_copy``."""

from __future__ import annotations

import numpy as np
import pytest

from kernelport.core.model_config import ModelConfig, TensorConfig
from kernelport.core.validation import requested_outputs, signature, validate_inputs
from kernelport.errors import ServerError
from kernelport.types import InferRequest, RequestedOutput, Tensor

CONFIG = ModelConfig(
    name="m",
    backend="python",
    max_batch_size=8,
    inputs=(
        TensorConfig(name="A", datatype="FP32", dims=(2,)),
        TensorConfig(name="B", datatype="INT64", dims=(-1,), optional=True),
        TensorConfig(name="C", datatype="FP32", dims=(1,)),
    ),
    outputs=(
        TensorConfig(name="Y", datatype="FP32", dims=(2,)),
        TensorConfig(name="Z", datatype="INT32", dims=(1,)),
    ),
)


def tensor(name: str, datatype: str, shape: tuple[int, ...]) -> Tensor:
    dtype = {"FP32": np.float32, "INT64": np.int64}[datatype]
    return Tensor(name, datatype, shape, np.zeros(shape, dtype))


def request(*inputs: Tensor, outputs: tuple[str, ...] = ()) -> InferRequest:
    return InferRequest("m", inputs=list(inputs), outputs=[RequestedOutput(n) for n in outputs])


def test_a_valid_request_gives_its_arrays_and_rows() -> None:
    arrays, rows = validate_inputs(
        CONFIG, request(tensor("A", "FP32", (3, 2)), tensor("C", "FP32", (3, 1)))
    )
    assert sorted(arrays) == ["A", "C"] and rows == 3


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ((tensor("A", "FP32", (1, 2)), tensor("B", "INT64", (1, 4))), "missing input(s) C"),
        ((tensor("B", "INT64", (1, 4)),), "missing input(s) A, C"),  # an optional one given
        ((tensor("A", "FP32", (1, 2)), tensor("X", "FP32", (1, 1))), "no input 'X'"),
        ((tensor("A", "FP32", (1, 2)), tensor("A", "FP32", (1, 2))), "given twice"),
        ((tensor("A", "INT64", (1, 2)),), "datatype INT64, expected FP32"),
        ((tensor("A", "FP32", (2,)),), "has rank 1, expected 2"),
        ((tensor("A", "FP32", (1, 3)),), "dimension 1: got 3, expected 2"),
        ((tensor("A", "FP32", (2, 2)), tensor("C", "FP32", (3, 1))), "batch size 3 differs"),
        ((tensor("A", "FP32", (0, 2)), tensor("C", "FP32", (0, 1))), "at least 1, got 0"),
    ],
)
def test_each_bad_input_is_named(inputs: tuple[Tensor, ...], message: str) -> None:
    with pytest.raises(ServerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_inputs(CONFIG, request(*inputs))


def test_requested_outputs_in_the_clients_order_or_all() -> None:
    assert requested_outputs(CONFIG, request()) == ["Y", "Z"]
    assert requested_outputs(CONFIG, request(outputs=("Z", "Y"))) == ["Z", "Y"]
    with pytest.raises(ServerError, match=r"no output 'Q' \(outputs: Y, Z\)"):
        requested_outputs(CONFIG, request(outputs=("Q",)))


def test_the_signature_is_kept_and_follows_a_model_copy() -> None:
    assert signature(CONFIG) is signature(CONFIG)
    assert signature(CONFIG).outputs["Z"].name == "INT32"
    unbatched = CONFIG.model_copy(update={"max_batch_size": 0})
    assert not signature(unbatched).batching and signature(CONFIG).batching
    arrays, rows = validate_inputs(
        unbatched, request(tensor("A", "FP32", (2,)), tensor("C", "FP32", (1,)))
    )
    assert rows == 1 and arrays["A"].shape == (2,)
    fewer = CONFIG.model_copy(update={"inputs": CONFIG.inputs[:1], "outputs": CONFIG.outputs[1:]})
    assert validate_inputs(fewer, request(tensor("A", "FP32", (1, 2))))[1] == 1
    assert requested_outputs(fewer, request()) == ["Z"]
