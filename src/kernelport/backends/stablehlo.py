"""StableHLO modules for the JAX backend: ``model.mlir`` (text) or ``model.mlirbc`` (MLIR
bytecode, plain StableHLO or a portable VHLO artifact), as Reactant, ``jax.jit(...).lower()``
or any StableHLO producer writes them.

The signature is read from the module's ``main`` function: one tensor per argument
(``INPUT__i``) and result (``OUTPUT__i``), with their element types and shapes. A dynamic
dimension (``tensor<?x4xf32>``) becomes a symbolic one; when every argument and result has a
dynamic first dimension, they share one symbol and the model batches along it, as a
``jax.export`` program with ``symbolic_shape("b, ...")`` does. The module is then wrapped in a
``jax.export.Exported`` (its documented fields, the module as a portable artifact), so the
JAX backend serves it exactly as a ``jax.export`` program: XLA compiles one executable per
batch bucket at load, refining the dynamic shapes to each bucket, and keeps them in the
persistent compilation cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from jax import export as jax_export
from jax import tree_util
from jax.core import ShapedArray
from jax.extend.mlir import ir, serialize_portable_artifact
from jax.extend.mlir.dialects import stablehlo

from kernelport.errors import invalid

FILES = ("model.mlir", "model.mlirbc")
#: StableHLO element types -> numpy dtypes (bf16 through ml_dtypes, which jax ships)
_TYPES = {
    "i1": "bool",
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
    "ui8": "uint8",
    "ui16": "uint16",
    "ui32": "uint32",
    "ui64": "uint64",
    "f16": "float16",
    "bf16": "bfloat16",
    "f32": "float32",
    "f64": "float64",
}
#: (shape with None for a dynamic dim, dtype)
Signature = tuple[tuple[int | None, ...], np.dtype[Any]]


def _context() -> Any:
    """An MLIR context with the func, StableHLO and CHLO dialects registered.

    Private JAX API (``jax._src.interpreters.mlir.make_ir_context``, the context JAX lowers
    in): jax 0.10's public ``jax.extend.mlir.ir.Context()`` registers neither the func
    dialect every module's ``main`` is written in nor a way to add it."""
    from jax._src.interpreters import mlir as jax_mlir

    return jax_mlir.make_ir_context()


def _dtype(element: Any, path: Path, what: str) -> np.dtype[Any]:
    name = str(element)
    if name not in _TYPES:
        raise invalid(f"{path}: {what} has element type {name}, not supported")
    if name == "bf16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(_TYPES[name])


def _signature(kind: Any, path: Path, what: str) -> Signature:
    try:
        ranked = ir.RankedTensorType(kind)
    except ValueError:
        raise invalid(f"{path}: {what} is {kind}, not a ranked tensor") from None
    shape = tuple(None if ir.ShapedType.is_dynamic_size(d) else int(d) for d in ranked.shape)
    return shape, _dtype(ranked.element_type, path, what)


def read_module(path: Path) -> tuple[str, list[Signature], list[Signature]]:
    """The module as text, and its ``main`` function's arguments and results."""
    data = path.read_bytes()
    with _context():
        try:
            if path.suffix == ".mlirbc" or data[:4] == b"ML\xefR":  # MLIR bytecode magic
                module = ir.Module.parse(data)
            else:
                module = ir.Module.parse(data.decode())
        except (ir.MLIRError, UnicodeDecodeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise invalid(f"{path}: not a StableHLO module: {first}") from None
        main = next(
            (
                op
                for op in module.body.operations
                if "sym_name" in op.attributes
                and ir.StringAttr(op.attributes["sym_name"]).value == "main"
            ),
            None,
        )
        if main is None:
            raise invalid(f"{path}: the module has no function named main")
        kind = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
        inputs = [_signature(t, path, f"argument {i}") for i, t in enumerate(kind.inputs)]
        outputs = [_signature(t, path, f"result {i}") for i, t in enumerate(kind.results)]
        return str(module), inputs, outputs


def _avals(
    path: Path, inputs: list[Signature], outputs: list[Signature]
) -> tuple[list[ShapedArray], list[ShapedArray]]:
    everything = [*inputs, *outputs]
    batched = bool(everything) and all(s and s[0] is None for s, _ in everything)
    names: dict[tuple[int, int], str] = {}
    for i, (shape, _) in enumerate(inputs):
        for d, size in enumerate(shape):
            if size is None:
                names[(i, d)] = "b" if batched and d == 0 else f"d{i}_{d}"
    for i, (shape, _) in enumerate(outputs):
        for d, size in enumerate(shape):
            if size is None and not (batched and d == 0):
                raise invalid(
                    f"{path}: result {i} has a dynamic dimension {d} that is not the batch "
                    "dimension every argument and result shares: not supported"
                )
    symbols = sorted(set(names.values()))
    made = jax_export.symbolic_shape(", ".join(symbols)) if symbols else ()
    dims = dict(zip(symbols, made, strict=True))

    def aval(index: int, sig: Signature, output: bool) -> ShapedArray:
        shape = [
            dims["b" if output else names[(index, d)]] if size is None else size
            for d, size in enumerate(sig[0])
        ]
        return ShapedArray(tuple(shape), sig[1])

    return (
        [aval(i, s, False) for i, s in enumerate(inputs)],
        [aval(i, s, True) for i, s in enumerate(outputs)],
    )


def as_exported(path: Path, platform: str) -> Any:
    """The module wrapped as a ``jax.export.Exported`` for ``platform`` ("cpu", "cuda")."""
    text, inputs, outputs = read_module(path)
    in_avals, out_avals = _avals(path, inputs, outputs)
    try:
        artifact = serialize_portable_artifact(text, stablehlo.get_current_version())
    except Exception as exc:  # the serializer's errors have no common type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise invalid(f"{path}: not a StableHLO module: {first}") from None
    none_in, none_out = (None,) * len(in_avals), (None,) * len(out_avals)
    return jax_export.Exported(
        fun_name="main",
        in_tree=tree_util.tree_structure((tuple(range(len(in_avals))), {})),
        in_avals=tuple(in_avals),
        out_tree=tree_util.tree_structure(tuple(range(len(out_avals)))),
        out_avals=tuple(out_avals),
        _has_named_shardings=False,
        _in_named_shardings=none_in,
        _out_named_shardings=none_out,
        in_shardings_hlo=none_in,
        out_shardings_hlo=none_out,
        nr_devices=1,
        platforms=(platform,),
        ordered_effects=(),
        unordered_effects=(),
        disabled_safety_checks=(),
        mlir_module_serialized=artifact,
        calling_convention_version=jax_export.maximum_supported_calling_convention_version,
        module_kept_var_idx=tuple(range(len(in_avals))),
        # dynamic dims: XLA needs the shapes refined per call (what JAX does for its own
        # shape-polymorphic programs)
        uses_global_constants=any(None in s for s, _ in (*inputs, *outputs)),
        _get_vjp=None,
    )
