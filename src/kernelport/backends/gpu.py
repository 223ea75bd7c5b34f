"""The device execution path shared by torch-based backends: CPU, and CUDA done properly.

A backend hands a :class:`DeviceRunner` a callable (``model(*tensors) -> tensor(s)``) and the
model's input/output specs; the runner does everything between numpy arrays and that call:

* CPU: zero-copy ``torch.from_numpy`` views (copied only when the request buffer is
  read-only), dtype casts, the call under ``torch.inference_mode``.
* CUDA: each runner (one per model instance) owns a CUDA stream. Inputs are staged in pinned
  host memory and copied with ``non_blocking=True`` on that stream, so the copies of one
  instance overlap the kernels of the others on the same GPU; outputs are copied back into
  pinned memory and the stream is synchronized once per batch.
* Warm-up at load runs the model on zero inputs at every batch-size bucket, so the first
  request pays no lazy initialisation, cuDNN autotuning or ``torch.compile`` compilation.
* Optional CUDA graphs: one graph per batch-size bucket, captured at load. A batch is padded
  (with zeros) up to the smallest bucket that holds it; outputs are sliced back to its rows.

The graph machinery is written against a ``GraphFactory`` seam so that the bucketing, padding
and slicing logic runs (and is tested) on CPU with an eager stand-in for a CUDA graph.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import torch

from kernelport.core.backend import Arrays
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.types import datatype_of

#: V2 datatype name -> torch dtype (BYTES has none: torch has no string tensors)
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
V2_DATATYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
_BF16 = np.dtype(ml_dtypes.bfloat16)

Model = Callable[..., Any]
#: Given a body that runs the model on static inputs, returns (static outputs, replay).
GraphFactory = Callable[
    [Callable[[], dict[str, torch.Tensor]]], tuple[dict[str, torch.Tensor], Callable[[], None]]
]


# --- devices ---------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda:N`` as a torch device; a clear error when CUDA or the index is missing."""
    if device == "cpu":
        return torch.device("cpu")
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise invalid(f"device '{device}': expected 'cpu' or 'cuda:N'")
    number = int(index or 0)
    if not torch.cuda.is_available():
        build = (
            f"a CUDA {torch.version.cuda} build, but no usable GPU or driver was found"
            if torch.version.cuda
            else "a CPU-only build"
        )
        raise ServerError(
            ErrorCode.UNAVAILABLE,
            f"device '{device}' needs CUDA, which is not available: torch {torch.__version__} "
            f"is {build}; use device 'cpu' or install a CUDA build of torch",
        )
    count = torch.cuda.device_count()
    if number >= count:
        raise invalid(
            f"device '{device}' does not exist: {count} CUDA device(s) are visible "
            f"(cuda:0 to cuda:{count - 1}; CUDA_VISIBLE_DEVICES renumbers them)"
        )
    return torch.device("cuda", number)


# --- batch-size buckets ----------------------------------------------------------------------


def batch_buckets(max_batch_size: int, preferred: Sequence[int] = ()) -> tuple[int, ...]:
    """Batch sizes to warm up and capture graphs for, ascending, always ending at the max.

    ``preferred`` (the dynamic batcher's preferred sizes) when given, else powers of two. An
    empty tuple means the model does not batch (one fixed shape).
    """
    if max_batch_size <= 0:
        return ()
    sizes = {b for b in preferred if 0 < b <= max_batch_size}
    if not sizes:
        size = 1
        while size < max_batch_size:
            sizes.add(size)
            size *= 2
    sizes.add(max_batch_size)  # every admissible batch must fit some bucket
    return tuple(sorted(sizes))


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``rows`` rows."""
    at = bisect.bisect_left(buckets, rows)
    if rows < 1 or at == len(buckets):
        raise invalid(f"batch of {rows} rows fits no batch-size bucket {list(buckets)}")
    return buckets[at]


# --- numpy <-> torch -------------------------------------------------------------------------


def to_torch(array: np.ndarray[Any, Any]) -> torch.Tensor:
    """A CPU tensor sharing ``array``'s memory (bf16 goes through an int16 view)."""
    if array.dtype == _BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if array.dtype == np.object_:
        raise invalid("BYTES tensors cannot be passed to a torch model")
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """A numpy view of a CPU tensor (bf16 comes back as ml_dtypes.bfloat16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_BF16)
    return tensor.numpy()


def name_outputs(result: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Match what a model returned (tensor, nested tuple/list, or dict) to the output names."""
    if isinstance(result, dict):
        missing = [n for n in names if n not in result]
        if missing:
            raise ServerError(
                ErrorCode.INTERNAL,
                f"the model returned a dict with keys {sorted(map(str, result))}, "
                f"missing configured output(s) {', '.join(missing)}",
            )
        return {n: result[n] for n in names}
    flat: list[Any] = []

    def walk(item: Any) -> None:
        if isinstance(item, tuple | list):
            for sub in item:
                walk(sub)
        else:
            flat.append(item)

    walk(result)
    if len(flat) != len(names):
        raise ServerError(
            ErrorCode.INTERNAL,
            f"the model returned {len(flat)} value(s) but the config lists {len(names)} "
            f"output(s) ({', '.join(names)})",
        )
    for name, value in zip(names, flat, strict=True):
        if not isinstance(value, torch.Tensor):
            raise ServerError(
                ErrorCode.INTERNAL,
                f"output '{name}': the model returned {type(value).__name__}, not a tensor",
            )
    return dict(zip(names, flat, strict=True))


# --- the runner ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IOSpec:
    """An input or output as the runner sees it: the wire dtype and dims without the batch."""

    name: str
    dtype: torch.dtype
    dims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RunnerOptions:
    """How to run: where, in which dtype, and whether to capture CUDA graphs."""

    device: torch.device
    batching: bool
    compute_dtype: torch.dtype | None = None  # floating inputs are cast to it before the call
    channels_last: bool = False  # 4-D inputs are made channels_last before the call
    buckets: tuple[int, ...] = ()
    cuda_graphs: bool = False
    #: False: run under ``torch.no_grad`` (Triton's INFERENCE_MODE=false), for models whose
    #: outputs or state must be ordinary tensors
    inference_mode: bool = True


@dataclass(slots=True)
class BucketGraph:
    """Static device buffers for one bucket and the replay that refills the outputs."""

    inputs: list[torch.Tensor]
    outputs: dict[str, torch.Tensor]
    replay: Callable[[], None]


def cuda_graph_factory(stream: torch.cuda.Stream, pool: Any) -> GraphFactory:
    """Capture ``body`` into a CUDA graph on ``stream``, sharing one memory pool per instance."""

    def capture(
        body: Callable[[], dict[str, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        # Warm up outside the capture: lazy init, cuBLAS workspaces and cuDNN autotuning
        # allocate or synchronize, which a capture forbids.
        for _ in range(3):
            body()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other instances keep running on their threads while this one captures.
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            outputs = body()
        return outputs, graph.replay

    return capture


class DeviceRunner:
    """Runs one model instance's batches on its device. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        model: Model,
        inputs: Sequence[IOSpec],
        outputs: Sequence[IOSpec],
        options: RunnerOptions,
        graph_factory: GraphFactory | None = None,
    ) -> None:
        self._model: Model | None = model
        self._inputs = list(inputs)
        self._outputs = list(outputs)
        self._names = [o.name for o in outputs]
        self._options = options
        self._cuda = options.device.type == "cuda"
        self._stream = torch.cuda.Stream(options.device) if self._cuda else None  # type: ignore[no-untyped-call]
        self._graphs: dict[int, BucketGraph] = {}
        if options.cuda_graphs:
            self._capture_all(graph_factory)

    @property
    def graph_buckets(self) -> tuple[int, ...]:
        """The bucket sizes with a captured graph (0 stands for a model that does not batch)."""
        return tuple(sorted(self._graphs))

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                torch.inference_mode() if self._options.inference_mode else torch.no_grad()
            )
            if self._stream is not None:
                stack.enter_context(torch.cuda.device(self._options.device))
                stack.enter_context(torch.cuda.stream(self._stream))
            yield

    # --- data movement -----------------------------------------------------------------------

    def _host(self, array: np.ndarray[Any, Any]) -> torch.Tensor:
        """``array`` as a CPU tensor the device path may read from (and the model may write)."""
        if not self._cuda:
            # Request tensors view the request bytes, which may be read-only: a model writing
            # in place must never scribble over (or fault on) them.
            return to_torch(array if array.flags.writeable else array.copy())
        # Pageable host memory would make the copy synchronous (and ~5x slower). The caching
        # host allocator keeps this block alive until the async copy from it has finished.
        dtype = TORCH_DTYPES[datatype_of(array).name]
        pinned = torch.empty(array.shape, dtype=dtype, pin_memory=True)
        np.copyto(to_numpy(pinned), array, casting="no")
        return pinned

    def _upload(self, array: np.ndarray[Any, Any]) -> torch.Tensor:
        host = self._host(array)
        return host.to(self._options.device, non_blocking=True) if self._cuda else host

    def _prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self._options.compute_dtype
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if self._options.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _call(self, tensors: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        assert self._model is not None, "runner used after close()"
        args = [None if t is None else self._prepare(t) for t in tensors]
        named = name_outputs(self._model(*args), self._names)
        # Cast on the device, so only the bytes the client gets cross the bus.
        return {spec.name: named[spec.name].to(spec.dtype) for spec in self._outputs}

    def _download(self, tensors: dict[str, torch.Tensor], rows: int | None) -> Arrays:
        host: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if rows is not None:
                tensor = tensor[:rows]
            if self._cuda:
                pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                pinned.copy_(tensor, non_blocking=True)
                host[name] = pinned
            else:
                host[name] = tensor.contiguous()
        if self._stream is not None:
            self._stream.synchronize()  # once per batch, after every output's copy is queued
        return {name: to_numpy(t) for name, t in host.items()}

    # --- execution ---------------------------------------------------------------------------

    def run(self, arrays: Arrays) -> Arrays:
        """Run one batch: numpy in, numpy out (outputs in the configured datatypes)."""
        with self._scope():
            if self._graphs:
                return self._replay(arrays)
            tensors = [
                None if spec.name not in arrays else self._upload(arrays[spec.name])
                for spec in self._inputs
            ]
            return self._download(self._call(tensors), None)

    def _rows(self, arrays: Arrays) -> int:
        first = arrays[self._inputs[0].name]
        return int(first.shape[0])

    def _replay(self, arrays: Arrays) -> Arrays:
        batching = self._options.batching
        rows = self._rows(arrays) if batching else 0
        graph = self._graphs[bucket_for(rows, self._options.buckets) if batching else 0]
        for spec, static in zip(self._inputs, graph.inputs, strict=True):
            source = self._host(arrays[spec.name])  # copied straight into the static buffer
            if batching:
                static[:rows].copy_(source, non_blocking=True)
                # Zero the padding so stale rows of an earlier batch cannot produce inf/NaN
                # work (their outputs are sliced away either way).
                static[rows:].zero_()
            else:
                static.copy_(source, non_blocking=True)
        graph.replay()
        return self._download(graph.outputs, rows if batching else None)

    def _shape(self, spec: IOSpec, batch: int | None) -> tuple[int, ...]:
        return spec.dims if batch is None else (batch, *spec.dims)

    def _capture_all(self, factory: GraphFactory | None) -> None:
        variable = [s.name for s in self._inputs if -1 in s.dims]
        if variable:
            raise invalid(
                f"cuda_graphs needs fixed input dims (besides the batch); variable: "
                f"{', '.join(variable)}"
            )
        if factory is None:
            if self._stream is None:
                raise invalid("cuda_graphs needs a CUDA device")
            factory = cuda_graph_factory(self._stream, torch.cuda.graph_pool_handle())
        keys: list[int] = list(self._options.buckets) if self._options.batching else [0]
        with self._scope():
            # Largest first: smaller graphs then reuse the shared pool's blocks.
            for key in sorted(keys, reverse=True):
                batch = key if self._options.batching else None
                static = [
                    torch.zeros(self._shape(s, batch), dtype=s.dtype, device=self._options.device)
                    for s in self._inputs
                ]
                outputs, replay = factory(functools.partial(self._call, static))
                self._graphs[key] = BucketGraph(static, outputs, replay)

    def warmup(self) -> list[int | None]:
        """Run every bucket once on zero inputs; returns the batch sizes run (None: no batch).

        Skipped (returns []) when an input has a variable non-batch dim: there is no shape to
        warm up with that the model is sure to accept.
        """
        if any(-1 in spec.dims for spec in self._inputs):
            return []
        sizes: list[int | None] = list(self._options.buckets) if self._options.batching else [None]
        for size in sizes:
            zeros = {
                spec.name: to_numpy(torch.zeros(self._shape(spec, size), dtype=spec.dtype))
                for spec in self._inputs
            }
            try:
                self.run(zeros)
            except Exception as exc:
                where = "" if size is None else f" at batch size {size}"
                raise ServerError(
                    ErrorCode.INTERNAL,
                    f"warm-up{where} on zero inputs failed: {type(exc).__name__}: {exc} "
                    "(set parameter warmup: false to skip it)",
                ) from exc
        return sizes

    def close(self) -> None:
        """Drop the model, graphs and buffers so their device memory can be reused."""
        self._graphs.clear()
        self._model = None
        if self._stream is not None:
            self._stream.synchronize()
