"""Hypothesis strategies for what a client can put on the wire: mostly-valid V2 requests with
one or more fields gone wrong, and plain garbage."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

from hypothesis import strategies as st

DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]
INPUT_NAMES = ["INPUT0", "INPUT1", "", "input", "INPUT0\x00"]

#: names a client may send where a model name goes: traversal, absolute, unicode, huge
HOSTILE_NAMES = [
    "..",
    ".",
    "../../victim/evil",
    "../victim",
    "/etc",
    "/tmp/x",
    "a/b",
    "a\\b",
    "a\x00b",
    "%2e%2e",
    ".hidden",
    "\u0661",
    "名前",
    "m" * 300,
    "victim/../..",
    " ",
    "\n",
    "con",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)

dims = st.integers(-3, 4) | st.sampled_from([0, 2**31, 2**62, 2**63 - 1, -(2**63)])
shapes = st.lists(dims, max_size=4) | json_values
small_shapes = st.lists(st.integers(0, 3), min_size=1, max_size=3)


def _data_for(shape: list[int]) -> st.SearchStrategy[Any]:
    count = 1
    for d in shape:
        count *= d
    element = st.integers(-(2**40), 2**40) | st.floats() | st.booleans() | st.text(max_size=4)
    return st.lists(element, min_size=count, max_size=count) | json_values


@st.composite
def rest_input(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": draw(st.sampled_from(INPUT_NAMES) | st.text(max_size=6)),
        "datatype": draw(st.sampled_from(DATATYPES) | st.text(max_size=5)),
    }
    shape = draw(small_shapes | shapes)
    if draw(st.booleans()):
        entry["shape"] = shape
    if draw(st.booleans()):
        valid = isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 8 for d in shape)
        entry["data"] = draw(_data_for(shape) if valid else json_values)
    if draw(st.booleans()):
        size = st.integers(-5, 64) | st.sampled_from([2**40, 2**63]) | json_values
        entry["parameters"] = draw(
            st.fixed_dictionaries({}, optional={"binary_data_size": size})
            | st.dictionaries(st.text(max_size=6), json_values, max_size=2)
            | json_values
        )
    return entry


request_parameters = st.fixed_dictionaries(
    {},
    optional={
        "timeout": st.integers(-5, 2**64) | st.floats() | st.text(max_size=4) | st.booleans(),
        "priority": st.integers(-5, 2**64) | st.floats() | st.text(max_size=4),
        "binary_data_output": json_values,
    },
)


@st.composite
def rest_infer_body(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A body and headers for POST .../infer: JSON, JSON + binary, or garbage."""
    headers: dict[str, str] = {}
    kind = draw(st.sampled_from(["json", "binary", "garbage"]))
    if kind == "garbage":
        body = draw(st.binary(max_size=256))
    else:
        obj: dict[str, Any] = {"inputs": draw(st.lists(rest_input(), max_size=3) | json_values)}
        if draw(st.booleans()):
            obj["parameters"] = draw(request_parameters | json_values)
        if draw(st.booleans()):
            obj["outputs"] = draw(
                st.lists(st.fixed_dictionaries({"name": st.sampled_from(["OUTPUT0", "x"])}))
                | json_values
            )
        if draw(st.booleans()):
            obj["id"] = draw(json_values)
        header = json.dumps(obj).encode()  # stdlib: integers beyond 64 bits too
        body = header
        if kind == "binary":
            body += draw(st.binary(max_size=128))
            length = draw(
                st.sampled_from([str(len(header)), "", "-1", "\u0661\u0662", "1e3", " 7"])
                | st.integers(-10, 2**64).map(str)
            )
            headers["Inference-Header-Content-Length"] = length
    encoding = draw(st.sampled_from([None, None, "gzip", "deflate", "br", "gzip-garbage"]))
    if encoding == "gzip":
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    elif encoding == "gzip-garbage":
        headers["Content-Encoding"] = "gzip"
    elif encoding is not None:
        headers["Content-Encoding"] = encoding
    return body, headers


@st.composite
def load_parameters(draw: st.DrawFn) -> dict[str, Any]:
    """Repository load parameters: a config override and uploaded files, often wrong."""
    params: dict[str, Any] = {}
    if draw(st.booleans()):
        params["config"] = draw(
            st.sampled_from(['{"backend": "identity"}', "{", '{"max_batch_size": -1}'])
            | json_values
        )
    keys = st.sampled_from(
        [
            "file:1/model.onnx",
            "file:../x",
            "file:/abs",
            "file:1//m",
            "file:./1/m",
            "file:",
            "file:1/../../../victim/evil",
            "file:1\\m",
            "file:1/\x00",
            "file:1",
        ]
    ) | st.text(max_size=12).map(lambda t: "file:" + t)
    good_base64 = st.binary(max_size=32).map(lambda b: base64.b64encode(b).decode())
    values = good_base64 | st.text(max_size=12) | json_values  # text: mostly bad base64
    params.update(draw(st.dictionaries(keys, values, max_size=3)))
    return params
