"""The REST codec in-process: V2 JSON and binary-extension bodies to and from core values.

Every client mistake is INVALID_ARGUMENT with a message naming the tensor or field at fault.
"""

from __future__ import annotations

import struct
from typing import Any

import ml_dtypes
import numpy as np
import orjson
import pytest

from kernelport.errors import ErrorCode, ServerError
from kernelport.limits import Limits
from kernelport.protocols.rest.codec import decode_request, encode_response
from kernelport.types import InferRequest, InferResponse, RequestedOutput, Tensor


def _body(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _input(name: str = "x", datatype: str = "INT32", shape: Any = (2,), **extra: Any) -> Any:
    return {"name": name, "datatype": datatype, "shape": list(shape), **extra}


def _decode(obj: Any, binary: bytes = b"", limits: Limits | None = None) -> InferRequest:
    header = _body(obj)
    length = len(header) if binary else None
    return decode_request(header + binary, length, "m", "1", limits or Limits())


def _invalid(obj: Any, binary: bytes = b"", limits: Limits | None = None) -> str:
    with pytest.raises(ServerError) as info:
        _decode(obj, binary, limits)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return info.value.message


def _bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


# --- decoding: JSON tensors -----------------------------------------------------------------


def test_json_request_decodes_every_field() -> None:
    request = _decode(
        {
            "id": "req-1",
            "parameters": {"binary_data_output": True},
            "inputs": [_input(data=[[1, 2], [3, 4]], shape=(2, 2), parameters={"p": 1})],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        }
    )
    assert (request.model_name, request.model_version, request.id) == ("m", "1", "req-1")
    assert request.parameters == {"binary_data_output": True}
    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", "INT32", (2, 2))
    assert tensor.data.dtype == np.int32
    assert tensor.data.tolist() == [[1, 2], [3, 4]]
    assert request.outputs == [
        RequestedOutput("y", {"binary_data": False}),
        RequestedOutput("z", {}),
    ]


def test_a_non_string_id_becomes_its_text_and_a_missing_one_is_empty() -> None:
    assert _decode({"id": 7, "inputs": []}).id == "7"
    assert _decode({"inputs": []}).id == ""


@pytest.mark.parametrize(
    ("datatype", "data", "dtype"),
    [
        ("BOOL", [True, False], np.bool_),
        ("UINT8", [0, 255], np.uint8),
        ("UINT64", [0, 2**64 - 1], np.uint64),
        ("INT8", [-128, 127], np.int8),
        ("INT64", [-(2**63), 2**63 - 1], np.int64),
        ("FP32", [1, 2.5], np.float32),
        ("FP64", [-1.5, 3], np.float64),
    ],
)
def test_json_data_takes_each_datatype_range(datatype: str, data: list[Any], dtype: Any) -> None:
    [tensor] = _decode({"inputs": [_input(datatype=datatype, data=data)]}).inputs
    assert tensor.data.dtype == dtype
    assert tensor.data.tolist() == data


def test_json_bytes_are_utf8_encoded() -> None:
    [tensor] = _decode({"inputs": [_input(datatype="BYTES", data=["abc", "é"])]}).inputs
    assert tensor.data.dtype == object
    assert tensor.data.tolist() == [b"abc", "é".encode()]


def test_nested_lists_in_any_nesting_are_flattened_row_major() -> None:
    data = [[1, [2]], [[3], 4]]  # mixed depths, as Triton accepts
    [tensor] = _decode({"inputs": [_input(shape=(2, 2), data=data)]}).inputs
    assert tensor.data.tolist() == [[1, 2], [3, 4]]


def test_a_scalar_is_one_element() -> None:
    [tensor] = _decode({"inputs": [_input(shape=(1,), data=5)]}).inputs
    assert tensor.data.tolist() == [5]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_are_refused_in_json(datatype: str) -> None:
    message = _invalid({"inputs": [_input(datatype=datatype, data=[1, 2])]})
    assert message == f"input 'x': {datatype} data must use the binary data format"


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("INT32", [1, True], "INT32 data takes only integers in JSON, got a boolean (True)"),
        ("INT32", [1, 1.5], "INT32 data takes only integers in JSON, got a fraction (1.5)"),
        ("BOOL", [True, 1], "BOOL data takes only true or false in JSON, got an integer (1)"),
        ("FP32", [1.0, "a"], "FP32 data takes only numbers in JSON, got a string ('a')"),
        ("BYTES", ["a", 1], "BYTES data takes only strings in JSON, got an integer (1)"),
        ("FP32", [1.0, None], "FP32 data takes only numbers in JSON, got null (None)"),
        ("FP32", [1.0, {}], "FP32 data takes only numbers in JSON, got dict ({})"),
    ],
)
def test_json_elements_must_match_the_datatype(datatype: str, data: Any, expected: str) -> None:
    assert _invalid({"inputs": [_input(datatype=datatype, data=data)]}) == f"input 'x': {expected}"


@pytest.mark.parametrize(
    ("datatype", "value", "expected"),
    [
        ("UINT8", 256, "256 is out of range for UINT8 (0 to 255)"),
        ("INT8", -129, "-129 is out of range for INT8 (-128 to 127)"),
        ("UINT64", -1, "-1 is out of range for UINT64 (0 to 18446744073709551615)"),
        ("FP32", 1e300, "a value is out of range for FP32"),
    ],
)
def test_json_values_out_of_range_are_refused(datatype: str, value: Any, expected: str) -> None:
    message = _invalid({"inputs": [_input(datatype=datatype, data=[0, value])]})
    assert message == f"input 'x': {expected}"


def test_json_integers_past_64_bits_are_not_integers() -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], '
    body += b'"data": [18446744073709551616]}]}'
    with pytest.raises(ServerError) as info:
        decode_request(body, None, "m", "")
    assert info.value.message == (
        "input 'x': INT64 data takes only integers in JSON, got a fraction (1.8446744073709552e+19)"
    )
    huge = body.replace(b"18446744073709551616", b"1" + b"0" * 400)
    with pytest.raises(ServerError, match="request body is not valid JSON"):
        decode_request(huge, None, "m", "")


def test_json_element_count_must_match_the_shape() -> None:
    message = _invalid({"inputs": [_input(shape=(2, 2), data=[1, 2, 3])]})
    assert message == "input 'x': shape [2, 2] needs 4 elements, got 3"


def test_unknown_datatype_is_named() -> None:
    message = _invalid({"inputs": [_input(datatype="FP8", data=[1, 2])]})
    assert message.startswith("unknown datatype 'FP8', expected one of BOOL, UINT8")


# --- decoding: limits -----------------------------------------------------------------------


def test_element_limit_is_checked_before_reading_data() -> None:
    limits = Limits(max_tensor_elements=4)
    message = _invalid({"inputs": [_input(shape=(5,), data=[])]}, limits=limits)
    assert message == (
        "input 'x': shape [5] has 5 elements, over the limit of 4 (--max-tensor-elements)"
    )
    assert _decode({"inputs": [_input(shape=(4,), data=[1, 2, 3, 4])]}, limits=limits).inputs


def test_element_limit_applies_to_binary_tensors() -> None:
    limits = Limits(max_tensor_elements=1)
    message = _invalid({"inputs": [_input(parameters={"binary_data_size": 8})]}, b"\0" * 8, limits)
    assert "over the limit of 1 (--max-tensor-elements)" in message


def test_a_shape_whose_size_overflows_int64_is_refused() -> None:
    message = _invalid({"inputs": [_input(shape=(2**40, 2**40), data=[])]})
    assert message == (f"input 'x': shape [{2**40}, {2**40}] overflows a 64-bit element count")


def test_a_zero_sized_shape_is_fine() -> None:
    [tensor] = _decode({"inputs": [_input(shape=(0, 3), data=[])]}).inputs
    assert tensor.data.shape == (0, 3)


# --- decoding: binary tensors ---------------------------------------------------------------


def test_binary_tensors_are_views_in_order() -> None:
    a = np.arange(4, dtype=np.int32)
    b = np.array([1.5, -2], dtype=np.float64)
    request = _decode(
        {
            "inputs": [
                _input("a", "INT32", (2, 2), parameters={"binary_data_size": a.nbytes}),
                _input("b", "FP64", (2,), parameters={"binary_data_size": b.nbytes}),
            ]
        },
        a.tobytes() + b.tobytes(),
    )
    first, second = request.inputs
    assert first.data.tolist() == [[0, 1], [2, 3]]
    assert second.data.tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    ("datatype", "dtype"), [("FP16", np.float16), ("BF16", ml_dtypes.bfloat16)]
)
def test_half_floats_travel_as_binary(datatype: str, dtype: Any) -> None:
    values = np.array([1.0, -0.5, 2.0], dtype=dtype)
    [tensor] = _decode(
        {"inputs": [_input(datatype=datatype, shape=(3,), parameters={"binary_data_size": 6})]},
        values.tobytes(),
    ).inputs
    assert tensor.data.dtype == dtype
    assert tensor.data.astype(np.float32).tolist() == [1.0, -0.5, 2.0]


def test_binary_bytes_keep_non_utf8_elements() -> None:
    raw = _bytes_elements(b"\xff\xfe", b"", b"ok")
    [tensor] = _decode(
        {
            "inputs": [
                _input(datatype="BYTES", shape=(3,), parameters={"binary_data_size": len(raw)})
            ]
        },
        raw,
    ).inputs
    assert tensor.data.tolist() == [b"\xff\xfe", b"", b"ok"]


def test_binary_bytes_element_count_must_match_the_shape() -> None:
    raw = _bytes_elements(b"a")
    params = {"binary_data_size": len(raw)}
    message = _invalid({"inputs": [_input(datatype="BYTES", parameters=params)]}, raw)
    assert message == "input 'x': shape [2] needs 2 BYTES elements, got 1"


def test_truncated_bytes_elements_are_refused() -> None:
    raw = struct.pack("<I", 10) + b"abc"
    params = {"binary_data_size": len(raw)}
    message = _invalid({"inputs": [_input(datatype="BYTES", parameters=params)]}, raw)
    assert message == "input 'x': BYTES element at offset 0 declares 10 bytes but only 3 remain"
    message = _invalid(
        {"inputs": [_input(datatype="BYTES", parameters={"binary_data_size": 2})]}, b"ab"
    )
    assert message == "input 'x': truncated BYTES element length at offset 0"


def test_binary_size_must_match_the_shape() -> None:
    message = _invalid({"inputs": [_input(parameters={"binary_data_size": 4})]}, b"\0" * 4)
    assert message == "input 'x': INT32 shape [2] needs 8 bytes, got 4"


def test_binary_data_must_be_there() -> None:
    message = _invalid({"inputs": [_input(parameters={"binary_data_size": 8})]}, b"\0" * 3)
    assert message == "input 'x': expecting 8 bytes of binary data, only 3 remain"


def test_binary_data_after_the_inputs_is_refused() -> None:
    message = _invalid({"inputs": [_input(data=[1, 2])]}, b"\0" * 5)
    assert message == "unexpected 5 bytes of binary data after the inputs"


@pytest.mark.parametrize("size", [-1, "8", True, 1.5])
def test_binary_data_size_must_be_a_non_negative_integer(size: Any) -> None:
    message = _invalid({"inputs": [_input(parameters={"binary_data_size": size})]}, b"\0" * 8)
    assert message == "input 'x': binary_data_size must be a non-negative integer"


# --- decoding: the header length ------------------------------------------------------------


@pytest.mark.parametrize("length", [-1, 10_000])
def test_header_length_outside_the_body_is_refused(length: int) -> None:
    body = _body({"inputs": []})
    with pytest.raises(ServerError) as info:
        decode_request(body, length, "m", "")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message == (
        f"Inference-Header-Content-Length {length} is outside the body of {len(body)} bytes"
    )


def test_header_length_equal_to_the_body_means_no_binary_data() -> None:
    body = _body({"inputs": [_input(data=[1, 2])]})
    assert decode_request(body, len(body), "m", "").inputs[0].data.tolist() == [1, 2]


def test_a_header_length_cutting_the_json_is_invalid_json() -> None:
    body = _body({"inputs": []})
    with pytest.raises(ServerError, match="request body is not valid JSON"):
        decode_request(body, 3, "m", "")


# --- decoding: structure errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([], "request body must be a JSON object"),
        ({}, "request needs an 'inputs' list"),
        ({"inputs": {}}, "request needs an 'inputs' list"),
        ({"inputs": [1]}, "each input needs a 'name' string"),
        ({"inputs": [{"name": 1}]}, "each input needs a 'name' string"),
        ({"inputs": [{"name": "x", "shape": [1]}]}, "input 'x': 'datatype' must be a string"),
        (
            {"inputs": [_input(shape=[1, -1], data=[])]},
            "input 'x': 'shape' must be a list of non-negative integers",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT32", "shape": "2", "data": []}]},
            "input 'x': 'shape' must be a list of non-negative integers",
        ),
        (
            {"inputs": [_input(shape=[True], data=[1])]},
            "input 'x': 'shape' must be a list of non-negative integers",
        ),
        (
            {"inputs": [_input(parameters=[], data=[1, 2])]},
            "input 'x': 'parameters' must be an object",
        ),
        (
            {"inputs": [_input()]},
            "input 'x' must set exactly one of data, binary_data_size, shared_memory_region "
            "(got none)",
        ),
        (
            {"inputs": [_input(data=[1, 2], parameters={"binary_data_size": 8})]},
            "input 'x' must set exactly one of data, binary_data_size, shared_memory_region "
            "(got data, binary_data_size)",
        ),
        (
            {"inputs": [_input(parameters={"shared_memory_region": "r"})]},
            "input 'x': shared_memory_region needs shared_memory_byte_size",
        ),
        ({"inputs": [], "outputs": {}}, "'outputs' must be a list of requested outputs"),
        ({"inputs": [], "outputs": [{}]}, "each requested output needs a 'name' string"),
        (
            {"inputs": [], "outputs": [{"name": "y", "parameters": 1}]},
            "output 'y': 'parameters' must be an object",
        ),
        ({"inputs": [], "parameters": "x"}, "request: 'parameters' must be an object"),
    ],
)
def test_structure_errors_name_the_field(obj: Any, expected: str) -> None:
    assert _invalid(obj) == expected


def test_invalid_json_is_refused() -> None:
    with pytest.raises(ServerError) as info:
        decode_request(b"{not json", None, "m", "")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message.startswith("request body is not valid JSON: ")


# --- encoding -------------------------------------------------------------------------------


def _response(*outputs: Tensor, **extra: Any) -> InferResponse:
    return InferResponse("m", "1", extra.pop("id", ""), list(outputs), **extra)


def _request(outputs: list[RequestedOutput] | None = None, **parameters: Any) -> InferRequest:
    return InferRequest("m", outputs=outputs or [], parameters=parameters)


def _tensor(name: str, data: np.ndarray[Any, Any], datatype: str) -> Tensor:
    return Tensor(name, datatype, tuple(data.shape), data)


def test_all_json_response_has_no_header_length() -> None:
    out = _tensor("y", np.array([[1, 2], [3, 4]], dtype=np.int32), "INT32")
    body, length = encode_response(_request(), _response(out, id="r", parameters={"k": "v"}))
    assert length is None
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "id": "r",
        "parameters": {"k": "v"},
        "outputs": [{"name": "y", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]}],
    }


def test_an_empty_id_and_parameters_are_left_out() -> None:
    body, _ = encode_response(_request(), _response())
    assert orjson.loads(body) == {"model_name": "m", "model_version": "1", "outputs": []}


def test_binary_data_output_sends_every_output_binary() -> None:
    y = np.array([1.0, 2.0], dtype=np.float32)
    body, length = encode_response(
        _request(binary_data_output=True), _response(_tensor("y", y, "FP32"))
    )
    assert length is not None
    header = orjson.loads(body[:length])
    assert header["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}
    ]
    assert body[length:] == y.tobytes()


def test_per_output_binary_data_overrides_the_request_default() -> None:
    y = np.array([1, 2], dtype=np.int64)
    z = np.array([3], dtype=np.int8)
    outputs = [RequestedOutput("y", {"binary_data": True}), RequestedOutput("z", {})]
    body, length = encode_response(
        _request(outputs, binary_data_output=True),
        _response(_tensor("y", y, "INT64"), _tensor("z", z, "INT8")),
    )
    assert length is not None
    entries = orjson.loads(body[:length])["outputs"]
    assert entries[0]["parameters"] == {"binary_data_size": 16}
    assert entries[1]["data"] == [3]  # requested without binary_data: JSON
    assert body[length:] == y.tobytes()


def test_binary_outputs_are_concatenated_in_output_order() -> None:
    y = np.array([1, 2], dtype=np.uint16)
    s = np.array([b"\xff", b"ab"], dtype=object)
    body, length = encode_response(
        _request(binary_data_output=True),
        _response(_tensor("y", y, "UINT16"), _tensor("s", s, "BYTES")),
    )
    assert length is not None
    assert body[length:] == y.tobytes() + _bytes_elements(b"\xff", b"ab")


def test_non_contiguous_outputs_encode_row_major() -> None:
    data = np.arange(6, dtype=np.int32).reshape(2, 3).T  # a transposed view
    body, _ = encode_response(_request(), _response(_tensor("y", data, "INT32")))
    assert orjson.loads(body)["outputs"][0]["data"] == [0, 3, 1, 4, 2, 5]
    body, length = encode_response(
        _request(binary_data_output=True), _response(_tensor("y", data, "INT32"))
    )
    assert body[length:] == np.ascontiguousarray(data).tobytes()


def test_json_bytes_outputs_are_text() -> None:
    data = np.array([b"abc", "é".encode(), "plain str"], dtype=object)
    body, _ = encode_response(_request(), _response(_tensor("s", data, "BYTES")))
    assert orjson.loads(body)["outputs"][0]["data"] == ["abc", "é", "plain str"]


def test_non_utf8_bytes_cannot_be_json() -> None:
    data = np.array([b"ok", b"\xff"], dtype=object)
    with pytest.raises(ServerError) as info:
        encode_response(_request(), _response(_tensor("s", data, "BYTES")))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message == (
        "output 's' element 1 is not UTF-8 text and cannot be sent as a JSON string; "
        "request it with binary_data: true"
    )


def test_non_utf8_bytes_travel_binary() -> None:
    data = np.array([b"\xff\x00"], dtype=object)
    outputs = [RequestedOutput("s", {"binary_data": True})]
    body, length = encode_response(_request(outputs), _response(_tensor("s", data, "BYTES")))
    assert body[length:] == _bytes_elements(b"\xff\x00")


@pytest.mark.parametrize(
    ("datatype", "dtype"), [("FP16", np.float16), ("BF16", ml_dtypes.bfloat16)]
)
def test_half_float_outputs_need_binary_data(datatype: str, dtype: Any) -> None:
    data = np.array([1.0, 2.0], dtype=dtype)
    with pytest.raises(ServerError) as info:
        encode_response(_request(), _response(_tensor("h", data, datatype)))
    assert info.value.message == f"output 'h' is {datatype}; request it with binary_data: true"
    body, length = encode_response(
        _request(binary_data_output=True), _response(_tensor("h", data, datatype))
    )
    assert body[length:] == data.tobytes()


def test_bool_outputs_round_trip_in_both_forms() -> None:
    data = np.array([True, False])
    body, _ = encode_response(_request(), _response(_tensor("b", data, "BOOL")))
    assert orjson.loads(body)["outputs"][0]["data"] == [True, False]
    body, length = encode_response(
        _request(binary_data_output=True), _response(_tensor("b", data, "BOOL"))
    )
    assert body[length:] == b"\x01\x00"


def test_big_endian_outputs_are_sent_little_endian() -> None:
    data = np.array([1, 256], dtype=">i4")
    body, length = encode_response(
        _request(binary_data_output=True), _response(_tensor("y", data, "INT32"))
    )
    assert body[length:] == np.array([1, 256], dtype="<i4").tobytes()


def test_decode_of_an_encoded_binary_response_round_trips() -> None:
    """What the server sends binary, a client can send back as a request with no loss."""
    y = np.array([[0.25, -1.0]], dtype=np.float32)
    body, length = encode_response(
        _request(binary_data_output=True), _response(_tensor("y", y, "FP32"))
    )
    assert length is not None
    header = orjson.loads(body[:length])
    header["inputs"] = header.pop("outputs")
    again = _body(header)
    request = decode_request(again + body[length:], len(again), "m", "")
    assert request.inputs[0].data.tolist() == y.tolist()
