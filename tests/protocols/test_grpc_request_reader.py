"""A plain ModelInferRequest read from its bytes without protobuf (``request_reader``) must
decode to exactly what protobuf's message decodes to, and fail the same way: anything the
reader does not take is handed to protobuf."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelport.errors import ServerError
from kernelport.limits import Limits
from kernelport.protocols.grpc import codec
from kernelport.protocols.grpc.request_reader import PlainInferRequest, read_plain
from kernelport.schema import pb

msgs = pb.inference
LIMITS = Limits(max_tensor_elements=1 << 20)


def _outcome(data: bytes, parse: Any) -> tuple[Any, ...]:
    """What a request decodes to (comparable), or the error it gets."""
    try:
        request = codec.decode_request(parse(data), LIMITS)
    except ServerError as exc:
        return ("error", exc.code, exc.message)
    except Exception as exc:  # protobuf's own DecodeError
        return ("raised", type(exc).__name__, str(exc))
    inputs = [(t.name, t.datatype, t.shape, t.data.tobytes(), t.parameters) for t in request.inputs]
    outputs = [(o.name, o.parameters) for o in request.outputs]
    return (request.model_name, request.model_version, request.id, inputs, outputs,
            request.parameters, request.shm_outputs)  # fmt: skip


def _same_as_protobuf(data: bytes) -> Any:
    ours = _outcome(data, codec.parse_infer_request)
    assert ours == _outcome(data, msgs.ModelInferRequest.FromString)
    return ours


names = st.text(min_size=0, max_size=12)
dims = st.lists(
    st.integers(min_value=-3, max_value=6) | st.integers(-(2**63), 2**63 - 1), max_size=4
)
datatypes = st.sampled_from(["FP32", "INT64", "UINT8", "BOOL", "FP16", "BYTES", "NOPE"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    msg = msgs.ModelInferRequest(model_name=draw(names), model_version=draw(names), id=draw(names))
    for _ in range(draw(st.integers(0, 3))):
        entry = msg.inputs.add(name=draw(names), datatype=draw(datatypes), shape=draw(dims))
        if draw(st.integers(0, 9)) == 0:
            entry.parameters["binary_data_size"].int64_param = 4
        if draw(st.integers(0, 9)) == 0:
            entry.contents.fp32_contents.append(1.0)
    for _ in range(draw(st.integers(0, 2))):
        out = msg.outputs.add(name=draw(names))
        if draw(st.integers(0, 5)) == 0:
            out.parameters["binary_data"].bool_param = True
    msg.raw_input_contents.extend(draw(st.lists(st.binary(max_size=48), max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        value = msg.parameters[draw(st.sampled_from(["a", "sequence_id", "", "é"]))]
        kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "none"]))
        if kind == "bool":
            value.bool_param = draw(st.booleans())
        elif kind == "int64":
            value.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "string":
            value.string_param = draw(names)
        elif kind == "double":
            value.double_param = draw(st.floats(allow_nan=False))
        elif kind == "uint64":
            value.uint64_param = draw(st.integers(0, 2**64 - 1))
    return bytes(msg.SerializeToString())


@settings(max_examples=400, deadline=None)
@given(requests())
def test_any_request_decodes_as_protobufs_does(data: bytes) -> None:
    _same_as_protobuf(data)


@settings(max_examples=300, deadline=None)
@given(requests(), st.data())
def test_a_cut_or_damaged_request_fails_as_protobufs_does(data: bytes, draw: st.DataObject) -> None:
    if not data:
        return
    cut = draw.draw(st.integers(0, len(data) - 1))
    _same_as_protobuf(data[:cut])
    flipped = bytearray(data)
    flipped[cut] ^= draw.draw(st.integers(1, 255))
    _same_as_protobuf(bytes(flipped))


def test_a_plain_request_is_read_without_protobuf_and_its_tensors_view_the_bytes() -> None:
    x = np.arange(6, dtype=np.float32)
    msg = msgs.ModelInferRequest(model_name="mlp", model_version="2", id="r1")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 3])
    msg.outputs.add(name="OUTPUT0")
    msg.raw_input_contents.append(x.tobytes())
    data = msg.SerializeToString()
    parsed = codec.parse_infer_request(data)
    assert type(parsed) is PlainInferRequest
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("mlp", "2", "r1")
    assert parsed.inputs == [("INPUT0", "FP32", (2, 3))]
    assert parsed.outputs == ["OUTPUT0"]
    request = codec.decode_request(parsed)
    assert request.inputs[0].data.tolist() == x.reshape(2, 3).tolist()
    assert request.inputs[0].data.base is not None and not request.inputs[0].data.flags.writeable
    assert _same_as_protobuf(data)[3][0][2] == (2, 3)
    # a memoryview (as the transport hands it over) reads the same
    assert codec.parse_infer_request(memoryview(data)).inputs == parsed.inputs


def test_request_parameters_as_perf_analyzer_sends_them_are_read_without_protobuf() -> None:
    msg = msgs.ModelInferRequest(model_name="mlp")
    msg.parameters["triton_enable_empty_final_response"].bool_param = True
    msg.parameters["priority"].uint64_param = 2**64 - 1
    msg.parameters["timeout"].int64_param = -5
    msg.parameters["tag"].string_param = "x"
    msg.parameters["scale"].double_param = 0.5
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    msg.outputs.add(name="OUTPUT0")
    msg.raw_input_contents.append(bytes(8))
    data = msg.SerializeToString()
    parsed = read_plain(data)
    assert parsed is not None
    expected = {"triton_enable_empty_final_response": True, "priority": 2**64 - 1,
                "timeout": -5, "tag": "x", "scale": 0.5}  # fmt: skip
    assert parsed.parameters == expected
    assert _same_as_protobuf(data)[5] == expected


@pytest.mark.parametrize(
    "entry",
    [
        b"",  # an empty entry: key "" and no value
        b"\x0a\x01k",  # a key without a value
        b"\x12\x02\x08\x01",  # a value without a key
        b"\x0a\x01k\x12\x00",  # a value with no choice set: not in the map
        b"\x0a\x01k\x12\x04\x08\x01\x10\x02",  # two choices: the last wins
        b"\x12\x02\x08\x01\x0a\x01k",  # the value before the key
    ],
)
def test_unusual_parameter_entries_are_left_to_protobuf(entry: bytes) -> None:
    data = b"\x0a\x01m" + b"\x22" + bytes([len(entry)]) + entry
    assert read_plain(data) is None
    _same_as_protobuf(data)


def test_unpacked_and_negative_dimensions() -> None:
    # shape as unpacked varints (field 3, wire type 0), as some encoders write it
    tensor = b"\x0a\x01a" + b"\x12\x04FP32" + b"\x18\x02" + b"\x18\x03"
    data = b"\x0a\x01m" + b"\x2a" + bytes([len(tensor)]) + tensor + b"\x3a\x18" + b"\x00" * 24
    assert read_plain(data) is not None and read_plain(data).inputs == [("a", "FP32", (2, 3))]
    assert _same_as_protobuf(data)[3][0][2] == (2, 3)
    minus_one = b"\xff" * 9 + b"\x01"
    tensor = (
        b"\x0a\x01a" + b"\x12\x04FP32" + b"\x1a" + bytes([len(minus_one) + 1]) + minus_one + b"\x02"
    )
    data = b"\x0a\x01m" + b"\x2a" + bytes([len(tensor)]) + tensor + b"\x3a\x00"
    assert read_plain(data).inputs == [("a", "FP32", (-1, 2))]  # type: ignore[union-attr]
    assert "negative dimension" in _same_as_protobuf(data)[2]


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x02\xff\xfe",  # a model name that is not UTF-8: protobuf refuses it
        b"\x0a\x05mm",  # a field longer than the message
        b"\x08\x01",  # a varint where protobuf has a string
        b"\x82\x01\x00",  # field 16: unknown, kept by protobuf
        b"\x3a" + b"\xff" * 11,  # a size that never ends
    ],
)
def test_what_the_reader_does_not_take_is_left_to_protobuf(data: bytes) -> None:
    assert read_plain(data) is None
    _same_as_protobuf(data)
