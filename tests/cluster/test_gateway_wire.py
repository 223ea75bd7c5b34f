"""The model-name scan over raw protobuf bytes: equal to a real parse, and never a crash."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernelport.cluster.wire import Malformed, string_field
from kernelport.schema import pb


def _infer_request(model: str, payload: bytes = b"\x00" * 64) -> bytes:
    request = pb.inference.ModelInferRequest(model_name=model, model_version="3", id="r1")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[4, 4])
    tensor.parameters["p"].int64_param = -5  # a varint field inside a nested message
    request.parameters["priority"].uint64_param = 2**63
    request.raw_input_contents.append(payload)
    return bytes(request.SerializeToString())


@pytest.mark.parametrize("model", ["simple", "", "ünïcode-model", "m" * 300])
def test_reads_the_model_name_a_parse_reads(model: str) -> None:
    data = _infer_request(model)
    assert string_field(data, 1) == pb.inference.ModelInferRequest.FromString(data).model_name
    assert string_field(data, 1) == model


def test_last_occurrence_wins_as_in_a_parse() -> None:
    data = _infer_request("first") + bytes(
        pb.inference.ModelInferRequest(model_name="second").SerializeToString()
    )
    assert pb.inference.ModelInferRequest.FromString(data).model_name == "second"
    assert string_field(data, 1) == "second"


def test_fixed_width_fields_are_skipped() -> None:
    # field 2 fixed64, field 3 fixed32, then field 1
    data = b"\x11" + b"\x01" * 8 + b"\x1d" + b"\x02" * 4 + b"\x0a\x02ab"
    assert string_field(data, 1) == "ab"


def test_repository_requests_name_the_model_in_field_2() -> None:
    data = pb.inference.RepositoryModelLoadRequest(repository_name="r", model_name="m")
    assert string_field(bytes(data.SerializeToString()), 2) == "m"


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05ab",  # length past the end
        b"\x0a",  # no length
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # varint over 10 bytes
        b"\x08",  # varint field with no value
        b"\x11\x00\x00",  # truncated fixed64
        b"\x15\x00",  # truncated fixed32
        b"\x0b",  # start group
        b"\x0f",  # wire type 7
        b"\x00",  # field number 0
        b"\x0a\x02\xff\xfe",  # not UTF-8
    ],
)
def test_malformed_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(Malformed):
        string_field(data, 1)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_it(data: bytes) -> None:
    with contextlib.suppress(Malformed):
        assert isinstance(string_field(data, 1), str)


@given(st.text(max_size=50), st.integers(0, 200))
def test_every_truncation_of_a_request_is_either_read_or_refused(model: str, cut: int) -> None:
    data = _infer_request(model, b"x" * 20)
    prefix = data[: min(cut, len(data))]
    try:
        value = string_field(prefix, 1)
    except Malformed:
        return
    assert value in ("", model)  # a cut inside the name is refused, never half read
