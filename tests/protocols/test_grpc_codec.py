"""The gRPC codecs in-process: ModelInferRequest/Response (typed and raw contents) and the
small kernelport.v1 API, to and from core values. Client mistakes are INVALID_ARGUMENT naming
the tensor at fault."""

from __future__ import annotations

import struct
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from kernelport.errors import ErrorCode, ServerError
from kernelport.limits import Limits
from kernelport.native import compiled
from kernelport.protocols.grpc import codec, kernelport_v1
from kernelport.schema import pb
from kernelport.types import InferResponse, RequestedOutput, SharedMemoryRef, Tensor

msgs = pb.inference
v1 = pb.kernelport_v1


def _request(**fields: Any) -> Any:
    return msgs.ModelInferRequest(model_name="m", model_version="1", **fields)


def _invalid(msg: Any, limits: Limits | None = None, decode: Any = codec.decode_request) -> str:
    with pytest.raises(ServerError) as info:
        decode(msg, limits or Limits())
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return str(info.value.message)


def _bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


# --- ModelInferRequest: raw contents --------------------------------------------------------


def test_raw_contents_decode_in_input_order() -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    b = np.array([0.5], dtype=np.float64)
    msg = _request(id="r1", raw_input_contents=[a.tobytes(), b.tobytes()])
    msg.inputs.add(name="a", datatype="INT32", shape=[2, 3])
    msg.inputs.add(name="b", datatype="FP64", shape=[1])
    msg.outputs.add(name="y").parameters["binary_data"].bool_param = True
    msg.parameters["priority"].int64_param = 2
    msg.parameters["tag"].string_param = "t"
    request = codec.decode_request(msg)
    assert (request.model_name, request.model_version, request.id) == ("m", "1", "r1")
    assert request.inputs[0].data.tolist() == a.tolist()
    assert request.inputs[1].data.tolist() == [0.5]
    assert request.outputs == [RequestedOutput("y", {"binary_data": True})]
    assert request.parameters == {"priority": 2, "tag": "t"}


@pytest.mark.parametrize(
    ("datatype", "dtype"),
    [("FP16", np.float16), ("BF16", ml_dtypes.bfloat16), ("BOOL", np.bool_)],
)
def test_raw_contents_take_types_without_a_typed_field(datatype: str, dtype: Any) -> None:
    values = np.array([1, 0], dtype=dtype)
    msg = _request(raw_input_contents=[values.tobytes()])
    msg.inputs.add(name="x", datatype=datatype, shape=[2])
    [tensor] = codec.decode_request(msg).inputs
    assert tensor.data.dtype == dtype
    assert tensor.data.astype(np.float32).tolist() == [1.0, 0.0]


def test_raw_bytes_keep_non_utf8_elements() -> None:
    msg = _request(raw_input_contents=[_bytes_elements(b"\xff", b"")])
    msg.inputs.add(name="s", datatype="BYTES", shape=[2])
    assert codec.decode_request(msg).inputs[0].data.tolist() == [b"\xff", b""]


def test_raw_size_must_match_the_shape() -> None:
    msg = _request(raw_input_contents=[b"\0" * 4])
    msg.inputs.add(name="x", datatype="FP32", shape=[2])
    assert _invalid(msg) == "input 'x': FP32 shape [2] needs 8 bytes, got 4"


def test_an_input_without_data_is_named() -> None:
    msg = _request()
    msg.inputs.add(name="x", datatype="FP32", shape=[1])
    assert _invalid(msg) == "unable to find data for input tensor 'x'"


def test_unused_raw_contents_are_refused() -> None:
    msg = _request(raw_input_contents=[b"\0" * 4, b"\0"])
    msg.inputs.add(name="x", datatype="FP32", shape=[1])
    assert _invalid(msg) == "raw_input_contents has 2 entries but only 1 inputs use it"


def test_typed_and_raw_contents_cannot_mix() -> None:
    msg = _request(raw_input_contents=[b"\0" * 4])
    msg.inputs.add(name="x", datatype="FP32", shape=[1])
    typed = msg.inputs.add(name="y", datatype="INT32", shape=[1])
    typed.contents.int_contents.append(1)
    assert _invalid(msg) == ("input 'y': contents must not be set when raw_input_contents is used")


def test_shared_memory_inputs_need_a_byte_size() -> None:
    msg = _request()
    tensor = msg.inputs.add(name="x", datatype="FP32", shape=[1])
    tensor.parameters["shared_memory_region"].string_param = "r"
    assert _invalid(msg) == "input 'x': shared_memory_region needs shared_memory_byte_size"


def test_unknown_datatype_is_refused() -> None:
    msg = _request(raw_input_contents=[b"\0"])
    msg.inputs.add(name="x", datatype="FP8", shape=[1])
    assert _invalid(msg).startswith("unknown datatype 'FP8'")


def test_element_limit_is_checked_before_any_data() -> None:
    msg = _request()  # no data at all: the shape alone is refused
    msg.inputs.add(name="x", datatype="FP32", shape=[3, 3])
    assert _invalid(msg, Limits(max_tensor_elements=8)) == (
        "input 'x': shape [3, 3] has 9 elements, over the limit of 8 (--max-tensor-elements)"
    )


def test_negative_and_overflowing_shapes_are_refused() -> None:
    msg = _request(raw_input_contents=[b""])
    msg.inputs.add(name="x", datatype="FP32", shape=[-1])
    assert _invalid(msg) == "input 'x': shape [-1] has a negative dimension"
    msg = _request(raw_input_contents=[b""])
    msg.inputs.add(name="x", datatype="FP32", shape=[2**40, 2**40])
    assert _invalid(msg) == f"input 'x': shape [{2**40}, {2**40}] overflows a 64-bit element count"


# --- ModelInferRequest: typed contents ------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("BOOL", "bool_contents", [True, False], np.bool_),
        ("INT8", "int_contents", [-128, 127], np.int8),
        ("INT16", "int_contents", [-1, 2], np.int16),
        ("INT32", "int_contents", [-(2**31), 2**31 - 1], np.int32),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1], np.int64),
        ("UINT8", "uint_contents", [0, 255], np.uint8),
        ("UINT16", "uint_contents", [0, 65535], np.uint16),
        ("UINT32", "uint_contents", [0, 2**32 - 1], np.uint32),
        ("UINT64", "uint64_contents", [0, 2**64 - 1], np.uint64),
        ("FP32", "fp32_contents", [0.5, -2.0], np.float32),
        ("FP64", "fp64_contents", [0.25, 1e300], np.float64),
    ],
)
def test_typed_contents_decode_each_type(
    datatype: str, field: str, values: list[Any], dtype: Any
) -> None:
    msg = _request()
    tensor = msg.inputs.add(name="x", datatype=datatype, shape=[2, 1])
    getattr(tensor.contents, field).extend(values)
    [decoded] = codec.decode_request(msg).inputs
    assert decoded.data.dtype == dtype
    assert decoded.data.reshape(-1).tolist() == values
    assert decoded.shape == (2, 1)


def test_typed_bytes_contents() -> None:
    msg = _request()
    tensor = msg.inputs.add(name="s", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"\xff", b"text"])
    assert codec.decode_request(msg).inputs[0].data.tolist() == [b"\xff", b"text"]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_must_be_raw(datatype: str) -> None:
    msg = _request()
    tensor = msg.inputs.add(name="h", datatype=datatype, shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    assert _invalid(msg) == f"input 'h': {datatype} data must be sent in raw_input_contents"


def test_typed_count_must_match_the_shape() -> None:
    msg = _request()
    tensor = msg.inputs.add(name="x", datatype="INT32", shape=[3])
    tensor.contents.int_contents.extend([1, 2])
    assert _invalid(msg) == "input 'x': shape [3] needs 3 elements, int_contents holds 2"


def test_typed_values_out_of_range_are_refused() -> None:
    msg = _request()
    tensor = msg.inputs.add(name="x", datatype="INT8", shape=[1])
    tensor.contents.int_contents.append(1000)
    assert _invalid(msg).startswith("input 'x': value out of range for INT8")


def test_typed_element_limit() -> None:
    msg = _request()
    tensor = msg.inputs.add(name="x", datatype="INT32", shape=[4])
    tensor.contents.int_contents.extend([1, 2, 3, 4])
    assert "over the limit of 3" in _invalid(msg, Limits(max_tensor_elements=3))


# --- parameters and ModelInferResponse ------------------------------------------------------


def test_parameters_take_each_kind_and_skip_unset() -> None:
    msg = _request()
    msg.parameters["b"].bool_param = True
    msg.parameters["i"].int64_param = -3
    msg.parameters["s"].string_param = "x"
    msg.parameters["d"].double_param = 0.5
    msg.parameters["u"].uint64_param = 7
    msg.parameters["empty"].SetInParent()  # no choice set: left out
    assert codec.parameters(msg.parameters) == {"b": True, "i": -3, "s": "x", "d": 0.5, "u": 7}


def test_response_outputs_are_raw_in_order() -> None:
    y = np.array([[1.5, 2.5]], dtype=np.float32)
    s = np.array([b"\xff", b"ok"], dtype=object)
    h = np.array([1.0], dtype=ml_dtypes.bfloat16)
    response = InferResponse(
        "m", "2", "r",
        [Tensor("y", "FP32", (1, 2), y), Tensor("s", "BYTES", (2,), s),
         Tensor("h", "BF16", (1,), h)],
    )  # fmt: skip
    out = codec.encode_response(response)
    assert (out.model_name, out.model_version, out.id) == ("m", "2", "r")
    assert [(o.name, o.datatype, list(o.shape)) for o in out.outputs] == [
        ("y", "FP32", [1, 2]),
        ("s", "BYTES", [2]),
        ("h", "BF16", [1]),
    ]
    assert list(out.raw_output_contents) == [
        y.tobytes(),
        _bytes_elements(b"\xff", b"ok"),
        h.tobytes(),
    ]


def test_an_encoded_response_decodes_back_as_a_request() -> None:
    y = np.arange(4, dtype=np.int16).reshape(2, 2)
    out = codec.encode_response(InferResponse("m", "1", "", [Tensor("y", "INT16", (2, 2), y)]))
    msg = _request(raw_input_contents=out.raw_output_contents)
    msg.inputs.add(name="y", datatype="INT16", shape=out.outputs[0].shape)
    assert codec.decode_request(msg).inputs[0].data.tolist() == y.tolist()


_RESPONSES = {
    "every field": InferResponse(
        "m", "2", "r-\u00e9",
        [Tensor("y", "FP32", (1, 2), np.array([[1.5, 2.5]], np.float32)),
         Tensor("s", "BYTES", (2,), np.array([b"\xff", b""], dtype=object)),
         Tensor("h", "BF16", (1,), np.array([1.0], dtype=ml_dtypes.bfloat16)),
         Tensor("scalar", "INT64", (), np.array(7, np.int64)),
         Tensor("none", "FP32", (0, 300), np.zeros((0, 300), np.float32)),
         Tensor("", "UINT8", (200,), np.arange(200, dtype=np.uint8))],
    ),
    "empty strings": InferResponse("", "", "", []),
    "big": InferResponse("m", "", "", [Tensor("x", "FP32", (70000,), np.ones(70000, np.float32))]),
    "not contiguous": InferResponse(
        "m", "", "", [Tensor("t", "INT32", (2, 2), np.arange(4, dtype=np.int32).reshape(2, 2).T)]
    ),
}  # fmt: skip
if "kernelport.types" not in compiled():  # compiled, Tensor refuses a list shape outright
    _RESPONSES["list shape"] = InferResponse(
        "m",
        "",
        "",
        [Tensor("x", "INT8", [2], np.ones(2, np.int8))],  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("name", list(_RESPONSES))
def test_response_bytes_are_the_serialized_response(name: str) -> None:
    response = _RESPONSES[name]
    expected = codec.encode_response(response).SerializeToString()
    assert codec.response_bytes(response) == expected
    assert codec.response_bytes(response) == expected  # its output fields from the cache


def test_response_bytes_with_shared_memory_outputs() -> None:
    y = np.array([1, 2], np.int32)
    response = InferResponse(
        "m", "1", "", [Tensor("a", "INT32", (2,), y), Tensor("b", "INT32", (2,), y)]
    )
    shm = {"a": SharedMemoryRef("region", 8, 16)}
    payload = codec.response_bytes(response, shm)
    assert payload == codec.encode_response(response, shm).SerializeToString()
    out = msgs.ModelInferResponse.FromString(payload)
    assert list(out.raw_output_contents) == [b"", y.tobytes()]


def test_response_bytes_forget_output_shapes_past_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(codec, "_OUTPUT_FIELDS", {})
    monkeypatch.setattr(codec, "_OUTPUT_FIELDS_MAX", 2)
    for rows in (1, 2, 3):
        x = np.zeros((rows, 2), np.float32)
        response = InferResponse("m", "", "", [Tensor("x", "FP32", (rows, 2), x)])
        assert codec.response_bytes(response) == codec.encode_response(response).SerializeToString()
    assert list(codec._OUTPUT_FIELDS) == [("x", "FP32", (3, 2))]


# --- kernelport.v1 --------------------------------------------------------------------------


_NUMPY = {
    "FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT8": np.int8,
    "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
    "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_,
}  # fmt: skip


def test_v1_decode_maps_every_dtype() -> None:
    msg = v1.InferRequest(model="m")
    for name, v2 in kernelport_v1.DTYPES.items():
        if v2 == "BYTES":
            data = _bytes_elements(b"a")
        else:
            data = b"\0" * np.dtype(ml_dtypes.bfloat16 if v2 == "BF16" else _NUMPY[v2]).itemsize
        msg.inputs.add(name=f"in_{name}", dtype=v1.DType.Value(name), shape=[1], data=data)
    request = kernelport_v1.decode(msg)
    assert request.model_name == "m"
    assert request.model_version == ""
    assert [t.datatype for t in request.inputs] == list(kernelport_v1.DTYPES.values())


def test_v1_decode_reads_raw_little_endian_data() -> None:
    values = np.array([[1.0, -2.0]], dtype=np.float32)
    msg = v1.InferRequest(model="m")
    msg.inputs.add(name="x", dtype=v1.DType.Value("F32"), shape=[1, 2], data=values.tobytes())
    [tensor] = kernelport_v1.decode(msg).inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", "FP32", (1, 2))
    assert tensor.data.tolist() == values.tolist()


def test_v1_unspecified_dtype_is_refused() -> None:
    msg = v1.InferRequest(model="m")
    msg.inputs.add(name="x", shape=[1], data=b"\0" * 4)
    message = _invalid(msg, decode=kernelport_v1.decode)
    assert message == "input 'x': dtype DTYPE_UNSPECIFIED is not a tensor type"


def test_v1_unknown_dtype_number_is_refused() -> None:
    msg = v1.InferRequest(model="m")
    msg.inputs.add(name="x", dtype=99, shape=[1], data=b"\0" * 4)  # a newer client's enum
    assert _invalid(msg, decode=kernelport_v1.decode) == (
        "input 'x': dtype 99 (unknown) is not a tensor type"
    )


def test_v1_size_and_limits_are_checked() -> None:
    msg = v1.InferRequest(model="m")
    msg.inputs.add(name="x", dtype=v1.DType.Value("I64"), shape=[2], data=b"\0" * 8)
    assert _invalid(msg, decode=kernelport_v1.decode) == (
        "input 'x': INT64 shape [2] needs 16 bytes, got 8"
    )
    msg = v1.InferRequest(model="m")
    msg.inputs.add(name="x", dtype=v1.DType.Value("U8"), shape=[5], data=b"\0" * 5)
    message = _invalid(msg, Limits(max_tensor_elements=4), decode=kernelport_v1.decode)
    assert message == (
        "input 'x': shape [5] has 5 elements, over the limit of 4 (--max-tensor-elements)"
    )


def test_v1_encode_carries_data_and_timings() -> None:
    y = np.array([3, 4], dtype=np.uint32)
    s = np.array([b"\xfe"], dtype=object)
    response = InferResponse(
        "m", "1", "",
        [Tensor("y", "UINT32", (2,), y), Tensor("s", "BYTES", (1,), s)],
        queue_ns=5_000, compute_ns=12_999,
    )  # fmt: skip
    out = kernelport_v1.encode(response)
    assert (out.queued_us, out.backend_us) == (5, 12)
    assert [(o.name, v1.DType.Name(o.dtype), list(o.shape)) for o in out.outputs] == [
        ("y", "U32", [2]),
        ("s", "BYTES", [1]),
    ]
    assert out.outputs[0].data == y.tobytes()
    assert out.outputs[1].data == _bytes_elements(b"\xfe")


# --- large requests: raw tensors stay where they arrived ------------------------------------


def _large(**fields: Any) -> tuple[Any, list[np.ndarray[Any, Any]]]:
    a = np.arange(40_000, dtype=np.float32).reshape(2, 20_000)
    b = np.array([b"x", b"\xff\x00"], dtype=np.object_)
    msg = _request(id="big", **fields)
    msg.inputs.add(name="a", datatype="FP32", shape=[2, 20_000])
    msg.inputs.add(name="b", datatype="BYTES", shape=[2])
    msg.outputs.add(name="y").parameters["binary_data"].bool_param = True
    msg.parameters["priority"].int64_param = 2
    msg.raw_input_contents.extend([a.tobytes(), _bytes_elements(b"x", b"\xff\x00")])
    return msg, [a, b]


def test_a_large_request_is_parsed_with_its_raw_tensors_as_views() -> None:
    msg, (a, b) = _large()
    data = msg.SerializeToString()
    assert len(data) >= codec.SPLIT_AT
    parsed = codec.parse_infer_request(data)
    assert isinstance(parsed, codec.RawInputs)
    assert all(view.obj is data for view in parsed.raw_input_contents)  # nothing copied
    assert [bytes(v) for v in parsed.raw_input_contents] == list(msg.raw_input_contents)
    assert (parsed.model_name, parsed.id, len(parsed.inputs)) == ("m", "big", 2)
    request = codec.decode_request(parsed)
    plain = codec.decode_request(msgs.ModelInferRequest.FromString(data))
    assert (request.id, request.outputs, request.parameters) == (
        plain.id, plain.outputs, plain.parameters)  # fmt: skip
    assert request.inputs[0].data.tolist() == a.tolist()
    assert request.inputs[1].data.tolist() == b.tolist()
    assert not request.inputs[0].data.flags.writeable  # views of what was received


def test_raw_fields_anywhere_in_the_message_are_split_out() -> None:
    # Protobuf allows fields in any order: raw contents first, then the rest.
    msg, _ = _large()
    raw = msgs.ModelInferRequest(raw_input_contents=msg.raw_input_contents)
    rest = msgs.ModelInferRequest()
    rest.CopyFrom(msg)
    del rest.raw_input_contents[:]
    data = bytearray(raw.SerializeToString() + rest.SerializeToString())
    parsed = codec.parse_infer_request(memoryview(data))
    assert [bytes(v) for v in parsed.raw_input_contents] == list(msg.raw_input_contents)
    assert parsed.parameters["priority"].int64_param == 2
    request = codec.decode_request(parsed)
    assert not request.inputs[0].data.flags.writeable  # even over a writable buffer
    assert request.inputs[0].data.shape == (2, 20_000)


def test_a_small_request_with_tensor_parameters_is_protobufs_message() -> None:
    msg = _request(raw_input_contents=[b"\x00" * 8])
    msg.outputs.add(name="y").parameters["binary_data"].bool_param = True
    parsed = codec.parse_infer_request(msg.SerializeToString())
    assert type(parsed) is msgs.ModelInferRequest
    assert parsed == msg


@pytest.mark.parametrize("cut", [1, 3, 80_000])
def test_a_truncated_large_request_gets_protobufs_own_error(cut: int) -> None:
    data = _large()[0].SerializeToString()[:-cut]
    with pytest.raises(Exception) as split:
        codec.parse_infer_request(data)
    with pytest.raises(Exception) as whole:
        msgs.ModelInferRequest.FromString(data)
    assert (type(split.value), str(split.value)) == (type(whole.value), str(whole.value))


def test_malformed_field_kinds_are_left_to_protobuf() -> None:
    data = _large()[0].SerializeToString()
    for bad in (b"\x3b", b"\x3f", b"\x38" + b"\xff" * 11):  # group start, kind 7, long varint
        with pytest.raises(Exception) as split:
            codec.parse_infer_request(bad + data)
        with pytest.raises(Exception) as whole:
            msgs.ModelInferRequest.FromString(bad + data)
        assert type(split.value) is type(whole.value)
    # fixed-width fields are walked over (unknown to the schema, kept for protobuf)
    unknown = b"\x49" + b"\x00" * 8 + b"\x55" + b"\x00" * 4  # field 9 fixed64, 10 fixed32
    parsed = codec.parse_infer_request(unknown + data)
    assert len(parsed.raw_input_contents) == 2
