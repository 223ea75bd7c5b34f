"""Exact BF16 and BYTES tensors through ONNX Runtime's Python API.

ORT's numpy bridge cannot carry either type exactly: it has no numpy type for bfloat16, and
it converts string elements through ``str`` (``bytes`` become their ``repr``; non-UTF-8 text
fails both ways; ``S`` arrays lose NULs). So models with such tensors run through
``run_with_ort_values``:

- BF16 travels as an ``OrtValue`` built from the uint16 bit pattern, and comes back by
  copying the output's buffer (``data_ptr`` + ``tensor_size_in_bytes``).
- A string ``OrtValue`` is created by a tiny helper graph (``ConstantOfShape`` -> ``Cast`` to
  string) and each ``std::string`` element is then assigned the exact bytes with libstdc++'s
  exported ``std::string::assign(const char*, size_t)``; outputs are read from the same
  elements (pointer, length). ORT holds strings as ``std::string`` arrays; the layout is
  checked once by a probe round trip, and where it does not hold (another C++ runtime),
  BYTES fall back to UTF-8 text with an error naming the tensor for anything else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort

from kernelport.errors import invalid

log = logging.getLogger("kernelport.backends.onnxruntime")

ONNX_STRING = 8
ONNX_BFLOAT16 = 16
_BF16 = np.dtype(ml_dtypes.bfloat16)

# An ONNX model (opset 17): int64 shape -> ConstantOfShape(0) -> Cast(to=STRING) -> "strings".
# Serialized once with the onnx helper API (tests/backends/test_ort_values.py rebuilds it and
# compares) so the server does not need the onnx package at run time.
_STRING_MAKER = (
    b'\x08\x08\x12\nkernelport:\x89\x01\n7\n\x05shape\x12\x05zeros"\x0fConstantOfShape*\x16\n'
    b'\x05value*\n\x08\x01\x10\x07:\x01\x00B\x01v\xa0\x01\x04\n!\n\x05zeros\x12\x07strings"'
    b"\x04Cast*\t\n\x02to\x18\x08\xa0\x01\x02\x12\x07stringsZ\x11\n\x05shape\x12\x08\n\x06\x08"
    b"\x07\x12\x02\n\x00b\x0f\n\x07strings\x12\x04\n\x02\x08\x08B\x04\n\x00\x10\x11"
)
_ASSIGN = "_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE6assignEPKcm"
_PROBE = [b"", b"\x00", b"a\x00b\x00", b"\xff\xfe", bytes(range(256))]


class StdStrings:
    """Creates string ``OrtValue``s holding exact bytes and reads them back."""

    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._maker = ort.InferenceSession(
            _STRING_MAKER, sess_options=options, providers=["CPUExecutionProvider"]
        )
        path = ctypes.util.find_library("stdc++") or "libstdc++.so.6"
        assign = ctypes.CDLL(path)[_ASSIGN]
        assign.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        assign.restype = ctypes.c_void_p
        self._assign = assign
        self._stride = 0
        probe = self._empty((len(_PROBE),))
        self._stride = probe.tensor_size_in_bytes() // len(_PROBE)
        if [bytes(x) for x in self.read(probe).reshape(-1)] != [b"0"] * len(_PROBE):
            raise RuntimeError("std::string layout differs from (pointer, length)")
        made = self.make(np.array(_PROBE, dtype=np.object_))
        if list(self.read(made).reshape(-1)) != _PROBE:
            raise RuntimeError("std::string::assign round trip failed")

    def _empty(self, shape: tuple[int, ...]) -> Any:
        dims = ort.OrtValue.ortvalue_from_numpy(np.array(shape, dtype=np.int64))
        return self._maker.run_with_ort_values(["strings"], {"shape": dims})[0]

    def make(self, array: np.ndarray[Any, Any]) -> Any:
        """A string OrtValue of ``array``'s shape whose elements are exactly its bytes."""
        value = self._empty(tuple(array.shape))
        base = value.data_ptr()
        for i, item in enumerate(array.reshape(-1)):
            raw = item if isinstance(item, bytes) else str(item).encode()
            self._assign(base + i * self._stride, raw, len(raw))
        return value

    def read(self, value: Any) -> np.ndarray[Any, Any]:
        """The elements of a string OrtValue as an object array of ``bytes``."""
        shape = tuple(value.shape())
        count = int(np.prod(shape)) if shape else 1
        out = np.empty(count, dtype=np.object_)
        base = value.data_ptr()
        pair = ctypes.c_size_t * 2
        for i in range(count):
            pointer, length = pair.from_address(base + i * self._stride)
            out[i] = ctypes.string_at(pointer, length) if length else b""
        return out.reshape(shape)


_lock = threading.Lock()
_strings: list[StdStrings | None] = []


def std_strings() -> StdStrings | None:
    """The process's :class:`StdStrings`, or None where the probe failed (logged once)."""
    with _lock:
        if not _strings:
            try:
                _strings.append(StdStrings())
            except Exception as exc:
                log.warning(
                    "exact BYTES through ONNX Runtime is unavailable here (%s): string "
                    "tensors must hold UTF-8 text without trailing NULs",
                    exc,
                )
                _strings.append(None)
        return _strings[0]


def to_ortvalue(name: str, array: np.ndarray[Any, Any], onnx_type: str) -> Any:
    """An ``OrtValue`` for one input; ``onnx_type`` is ORT's type string, e.g. tensor(float)."""
    if onnx_type == "tensor(bfloat16)":
        if array.dtype != _BF16:
            raise invalid(f"input '{name}': expected BF16 data, got {array.dtype}")
        bits = np.ascontiguousarray(array).view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, ONNX_BFLOAT16)
    if onnx_type == "tensor(string)":
        strings = std_strings()
        if strings is not None:
            return strings.make(array)
        raise AssertionError("string inputs without StdStrings go through session.run")
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def from_ortvalue(value: Any) -> np.ndarray[Any, Any]:
    """A numpy array (a copy) of one output ``OrtValue``."""
    kind = value.data_type()
    if kind == "tensor(string)":
        strings = std_strings()
        assert strings is not None
        return strings.read(value)
    if kind == "tensor(bfloat16)":
        out = np.empty(tuple(value.shape()), dtype=_BF16)
        if out.size:
            ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
        return out
    return np.asarray(value.numpy())


def utf8_strings(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Fallback without :class:`StdStrings`: elements as ``str``, refusing what would change."""
    out = np.empty(array.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, item in enumerate(array.reshape(-1)):
        try:
            flat[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError:
            raise invalid(
                f"input '{name}': element {i} is not UTF-8 text, which this ONNX Runtime "
                "build cannot pass to a string tensor unchanged"
            ) from None
    return out
