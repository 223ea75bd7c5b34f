"""PyTorch backend (``kernelport[torch]``): TorchScript, exported programs, AOTInductor packages.

The version directory holds ``model.pt2`` or ``model.pt`` (or the file ``default_model_filename``
names). Its format is recognised from the archive's contents (see ``torch_archive``) unless
the ``format`` parameter says it: ``torchscript`` (``torch.jit.save``), ``exported``
(``torch.export.save``) or ``aoti`` (``torch._inductor.aoti_compile_and_package``).

Inputs are passed to the model positionally, in the config's order; outputs are matched to
the config's outputs in order (or by key when the model returns a dict). Backend parameters:

``format``         torchscript | exported | aoti (default: recognised from the file)
``dtype``          fp32 | fp16 | bf16: cast the model, and floating inputs before the call
``compile``        true: ``torch.compile`` the model at load (exported programs only)
``compile_mode``   torch.compile's mode (default | reduce-overhead | max-autotune | ...)
``channels_last``  true: model and 4-D inputs in channels_last memory format
``cuda_graphs``    true: one CUDA graph per batch-size bucket (CUDA devices only)
``warmup``         false: skip running zero inputs through every bucket at load
``allow_pickle``   true: load .pt2 files whose pickled members are not weights-only

Triton's PyTorch backend parameters are read too: ``INFERENCE_MODE`` (false: ``no_grad``
instead of ``inference_mode``), ``ENABLE_CACHE_CLEANING`` (CUDA cache emptied after each
batch), ``INTRA_OP_THREAD_COUNT`` / ``INTER_OP_THREAD_COUNT`` (PyTorch's per-process pools);
the others are reported at load with why they have no effect, and unknown names are reported.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernelport.backends.gpu import (
    TORCH_DTYPES,
    V2_DATATYPES,
    DeviceRunner,
    IOSpec,
    Model,
    RunnerOptions,
    batch_buckets,
    resolve_device,
)
from kernelport.backends.torch_archive import FORMATS, Format, check_pickles, detect_format
from kernelport.backends.torch_host import HostModule
from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.model_config import ModelConfig, TensorConfig
from kernelport.errors import ErrorCode, ServerError, invalid

log = logging.getLogger("kernelport.backends.torch")

DEFAULT_FILENAMES = ("model.pt2", "model.pt")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_KNOWN = {
    "format", "dtype", "compile", "compile_mode", "channels_last", "cuda_graphs", "warmup",
    "allow_pickle",
}  # fmt: skip
# Triton's PyTorch backend parameters that are applied here (see TorchParameters)
_TRITON_APPLIED = {
    "INFERENCE_MODE", "ENABLE_CACHE_CLEANING", "INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT",
}  # fmt: skip
# ... and those that are not, with why (reported once when the model loads)
_TRITON_NO_EFFECT = {
    "DISABLE_OPTIMIZED_EXECUTION": "a TorchScript graph-executor switch; KernelPort leaves "
    "TorchScript's executor at its defaults (exported programs and AOTInductor packages do "
    "not use it)",
    "ENABLE_JIT_EXECUTOR": "a TorchScript graph-executor switch left at its default",
    "ENABLE_JIT_PROFILING": "a TorchScript graph-executor switch left at its default",
    "ENABLE_TENSOR_FUSER": "a TorchScript graph-executor switch left at its default",
    "ENABLE_NVFUSER": "a TorchScript graph-executor switch left at its default",
    "DISABLE_CUDNN": "cuDNN is switched per process in PyTorch, not per model; use "
    "torch.backends.cudnn settings in a sitecustomize if every model needs it off",
    "ENABLE_WEIGHT_SHARING": "each instance loads its own copy of the weights",
    "ENABLE_DETERMINISTIC_ALGORITHMS": "deterministic algorithms are a per-process PyTorch "
    "switch, not applied per model",
}
_LABELS = {
    "torchscript": "TorchScript archive",
    "exported": "exported program",
    "aoti": "AOTInductor package",
}


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    # model.yaml gives booleans; Triton-style configs give strings.
    value = parameters.get(name, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise invalid(f"parameter {name} '{value}': expected true or false")


def _threads(parameters: dict[str, Any], name: str) -> int | None:
    if name not in parameters:
        return None
    text = str(parameters[name]).strip()
    if not (text.isascii() and text.isdigit()):
        raise invalid(f"parameter {name} '{parameters[name]}': expected a thread count")
    return int(text) or None  # 0: PyTorch's default


def _set_threads(params: TorchParameters, model: str) -> None:
    # PyTorch's thread pools are per process (Triton sets them once as well): the last model
    # loaded with a count decides the intra-op pool; the inter-op pool can only be sized
    # before its first use.
    if params.intra_op_threads is not None:
        torch.set_num_threads(params.intra_op_threads)
        log.info("model '%s': PyTorch intra-op threads set to %d for the whole process",
                 model, params.intra_op_threads)  # fmt: skip
    if params.inter_op_threads is not None:
        try:
            torch.set_num_interop_threads(params.inter_op_threads)
        except RuntimeError as exc:
            log.warning("model '%s': INTER_OP_THREAD_COUNT not applied: %s", model, exc)


@dataclass(frozen=True, slots=True)
class TorchParameters:
    """The backend parameters of a torch model, validated."""

    format: Format | None = None
    dtype: torch.dtype | None = None
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    cuda_graphs: bool = False
    warmup: bool = True
    allow_pickle: bool = False
    inference_mode: bool = True  # Triton's INFERENCE_MODE
    cache_cleaning: bool = False  # Triton's ENABLE_CACHE_CLEANING: empty the CUDA cache
    intra_op_threads: int | None = None  # Triton's INTRA_OP_THREAD_COUNT (process-wide)
    inter_op_threads: int | None = None  # Triton's INTER_OP_THREAD_COUNT (process-wide)

    @staticmethod
    def warnings(parameters: dict[str, Any], device: str) -> list[str]:
        """What the log should say about parameters that do nothing here, naming each."""
        out = [
            f"parameter {key} has no effect: {_TRITON_NO_EFFECT[key]}"
            for key in sorted(parameters)
            if key in _TRITON_NO_EFFECT
        ]
        if "ENABLE_CACHE_CLEANING" in parameters and not device.startswith("cuda"):
            out.append("parameter ENABLE_CACHE_CLEANING has no effect on a CPU instance")
        known = _KNOWN | _TRITON_APPLIED | set(_TRITON_NO_EFFECT)
        unknown = sorted(set(parameters) - known)
        if unknown:
            out.append(f"unknown parameter(s) {', '.join(unknown)} ignored by the torch backend")
        return out

    @classmethod
    def parse(cls, parameters: dict[str, Any]) -> TorchParameters:
        fmt = str(parameters.get("format", "")).lower() or None
        if fmt is not None and fmt not in FORMATS:
            raise invalid(f"parameter format '{fmt}': expected one of {', '.join(FORMATS)}")
        dtype_name = str(parameters.get("dtype", "")).lower()
        if dtype_name and dtype_name not in _DTYPES:
            raise invalid(f"parameter dtype '{dtype_name}': expected fp32, fp16 or bf16")
        mode = str(parameters.get("compile_mode", "default")).lower()
        if mode not in COMPILE_MODES:
            known = ", ".join(COMPILE_MODES)
            raise invalid(f"parameter compile_mode '{mode}': expected one of {known}")
        return cls(
            format=fmt,
            dtype=_DTYPES[dtype_name] if dtype_name else None,
            compile=_flag(parameters, "compile", False),
            compile_mode=mode,
            channels_last=_flag(parameters, "channels_last", False),
            cuda_graphs=_flag(parameters, "cuda_graphs", False),
            warmup=_flag(parameters, "warmup", True),
            allow_pickle=_flag(parameters, "allow_pickle", False),
            inference_mode=_flag(parameters, "INFERENCE_MODE", True),
            cache_cleaning=_flag(parameters, "ENABLE_CACHE_CLEANING", False),
            intra_op_threads=_threads(parameters, "INTRA_OP_THREAD_COUNT"),
            inter_op_threads=_threads(parameters, "INTER_OP_THREAD_COUNT"),
        )

    def check(self, fmt: Format, device: torch.device) -> None:
        """Refuse combinations that cannot work, naming the parameter."""
        fixed = [n for n, on in (("dtype", self.dtype is not None), ("compile", self.compile),
                                 ("channels_last", self.channels_last)) if on]  # fmt: skip
        if fmt == "aoti" and fixed:
            raise invalid(
                f"parameter(s) {', '.join(fixed)}: an AOTInductor package is already compiled "
                "for one dtype and layout; set them when exporting and compiling instead"
            )
        if fmt == "torchscript" and self.compile:
            raise invalid(
                "parameter compile: torch.compile cannot trace TorchScript; serve an exported "
                "program (torch.export.save) to compile it"
            )
        if self.cuda_graphs and device.type != "cuda":
            raise invalid(f"parameter cuda_graphs needs a CUDA device, not '{device}'")
        if self.cuda_graphs and self.compile and self.compile_mode == "reduce-overhead":
            raise invalid(
                "compile_mode reduce-overhead already captures CUDA graphs; "
                "drop cuda_graphs or pick another compile_mode"
            )


def model_file(version_path: Path, filename: str = "") -> Path:
    """The model file of a version directory: ``filename`` or the first default that exists."""
    candidates = [filename] if filename else list(DEFAULT_FILENAMES)
    for name in candidates:
        if (version_path / name).is_file():
            return version_path / name
    raise ServerError(
        ErrorCode.NOT_FOUND, f"model file not found: {version_path}/{' or '.join(candidates)}"
    )


# torch.export.load keeps its deserializer in a module global: two loads at once (models
# loading on demand in parallel) fail with "_CURRENT_DESERIALIZER is already set".
_EXPORT_LOAD = threading.Lock()


def load_exported(path: Path, allow_pickle: bool) -> torch.export.ExportedProgram:
    """``torch.export.load`` after refusing archives that would unpickle arbitrary objects."""
    if not allow_pickle:
        check_pickles(path)
    with _EXPORT_LOAD:
        return torch.export.load(str(path))


def _dims(shape: Any) -> list[int]:
    # Symbolic sizes (torch.export.Dim) are variable dims.
    return [d if isinstance(d, int) else -1 for d in shape]


def _v2(dtype: torch.dtype, what: str) -> str:
    if dtype not in V2_DATATYPES:
        raise invalid(f"{what}: dtype {dtype} has no KServe V2 datatype")
    return V2_DATATYPES[dtype]


def program_signature(
    program: torch.export.ExportedProgram,
) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, V2 datatype, dims) of an exported program's user inputs and outputs."""
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    nodes = {n.name: n for n in program.graph.nodes}
    inputs = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            raise invalid(f"exported program input {spec.arg} is not a tensor")
        val = nodes[spec.arg.name].meta["val"]
        inputs.append((spec.arg.name, _v2(val.dtype, f"input '{spec.arg.name}'"), _dims(val.shape)))
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = list(output_node.args[0])
    user = [
        values[i]
        for i, spec in enumerate(program.graph_signature.output_specs)
        if spec.kind == OutputKind.USER_OUTPUT
    ]
    names = [f"OUTPUT{i}" for i in range(len(user))]
    signature = program.module_call_graph[0].signature
    tree = signature.out_spec if signature is not None else None
    # A model returning a flat dict of tensors names its outputs by the dict's keys.
    if tree is not None and tree.type is dict and len(tree.context) == len(user):
        names = [str(key) for key in tree.context]
    outputs = []
    for name, node in zip(names, user, strict=True):
        val = getattr(node, "meta", {}).get("val")
        if not isinstance(val, torch.Tensor):
            raise invalid(f"exported program output {name} is not a tensor")
        outputs.append((name, _v2(val.dtype, f"output '{name}'"), _dims(val.shape)))
    return inputs, outputs


def _io(tensor: TensorConfig) -> IOSpec:
    if tensor.datatype not in TORCH_DTYPES:
        raise invalid(f"tensor '{tensor.name}': torch has no {tensor.datatype} tensors")
    return IOSpec(tensor.name, TORCH_DTYPES[tensor.datatype], tensor.dims)


def _load_model(path: Path, fmt: Format, device: torch.device, params: TorchParameters) -> Model:
    module: torch.nn.Module
    if fmt == "torchscript":
        # TorchScript's own unpickler only rebuilds tensors and TorchScript classes; there is
        # no weights_only switch because there is no Python pickle to restrict.
        module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        module.eval()
    elif fmt == "exported":
        program = load_exported(path, params.allow_pickle)
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            # Rewrites device constants baked into the graph, not just the weights.
            program = move_to_device_pass(program, device)
        module = program.module()  # eval/train mode was fixed at export time
    else:
        if not params.allow_pickle:
            check_pickles(path)
        from torch._inductor import aoti_load_package

        package = aoti_load_package(
            str(path),
            # One caller per instance at a time; skipping AOTI's locks is what lets a
            # captured CUDA graph contain its kernels.
            run_single_threaded=params.cuda_graphs,
            device_index=device.index if device.type == "cuda" and device.index is not None else -1,
        )
        compiled_for = package.get_metadata().get("AOTI_DEVICE_KEY", "")
        if compiled_for and compiled_for != device.type:
            raise invalid(
                f"{path.name} was compiled for {compiled_for}, but this instance runs on {device}"
            )
        return package
    if params.dtype is not None:
        module = module.to(params.dtype)
    if params.channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module


class TorchBackend:
    """Loads TorchScript, exported programs and AOTInductor packages."""

    name = "torch"
    platform = "pytorch_libtorch"

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if raw.get("inputs") and raw.get("outputs"):
            return raw
        params = TorchParameters.parse(raw.get("parameters") or {})
        path = model_file(version_path, raw.get("default_model_filename", ""))
        fmt = detect_format(path, params.format)
        if fmt != "exported":
            raise invalid(
                f"{path}: a {_LABELS[fmt]} does not record input and output shapes and "
                "datatypes; list inputs and outputs (name, datatype, dims) in model.yaml"
            )
        ins, outs = program_signature(load_exported(path, params.allow_pickle))
        out = dict(raw)
        if "max_batch_size" not in raw:
            # Every tensor with a dynamic first dim (torch.export.Dim): it batches along it.
            batchable = all(dims and dims[0] == -1 for _, _, dims in ins + outs)
            out["max_batch_size"] = int(raw.get("default_max_batch_size", 4)) if batchable else 0
        out.pop("default_max_batch_size", None)
        batching = int(out["max_batch_size"]) > 0
        if batching:
            fixed = [n for n, _, dims in ins + outs if not dims or dims[0] != -1]
            if fixed:
                raise invalid(
                    f"{path}: max_batch_size > 0, but {', '.join(fixed)} have no dynamic first "
                    "dim; export with dynamic_shapes={...: {0: torch.export.Dim('batch')}}"
                )

        def specs(items: list[tuple[str, str, list[int]]]) -> list[dict[str, Any]]:
            skip = 1 if batching else 0
            return [{"name": n, "datatype": t, "dims": dims[skip:]} for n, t, dims in items]

        out["inputs"] = raw.get("inputs") or specs(ins)
        out["outputs"] = raw.get("outputs") or specs(outs)
        return out

    def load(self, context: LoadContext) -> TorchInstance:
        config = context.config
        params = TorchParameters.parse(config.parameters)
        device = resolve_device(context.device)
        if context.instance_index == 0:  # once per model load, not per instance
            for warning in TorchParameters.warnings(config.parameters, context.device):
                log.warning("model '%s': %s", config.name, warning)
            _set_threads(params, config.name)
        if not config.inputs or not config.outputs:
            raise invalid(f"torch model '{config.name}' needs inputs and outputs in its config")
        inputs = [_io(t) for t in config.inputs]
        outputs = [_io(t) for t in config.outputs]
        started = time.perf_counter()
        key = ("torch", context.instance_index)
        named = _named_file(context.version_path, config.default_model_filename)
        kept = context.host.get(key, named) if context.host is not None else None
        model: Model | None = kept.restore(device) if isinstance(kept, HostModule) else None
        if isinstance(kept, HostModule) and model is not None:
            fmt, source = kept.format, "host memory"  # checked when it was first loaded
        else:
            path = model_file(context.version_path, config.default_model_filename)
            fmt, source = detect_format(path, params.format), path.name
            params.check(fmt, device)
            model = loaded = _load_model(path, fmt, device, params)
            kept = None
            # on_demand: keep the module (its weights pinned, on CUDA) for the next load;
            # an AOTInductor package holds its weights in its own runtime: read again
            if context.host is not None and isinstance(loaded, torch.nn.Module):
                kept = HostModule(loaded, device, fmt)
                context.host.put(key, kept, path)
        if params.compile:
            model = torch.compile(model, mode=params.compile_mode)
        options = RunnerOptions(
            device=device,
            batching=config.batching,
            compute_dtype=params.dtype,
            channels_last=params.channels_last,
            buckets=_buckets(config),
            cuda_graphs=params.cuda_graphs,
            inference_mode=params.inference_mode,
        )
        assert model is not None
        runner = DeviceRunner(model, inputs, outputs, options)
        try:
            warmed = runner.warmup() if params.warmup else []
        except BaseException:
            runner.close()
            raise
        log.info(
            "model '%s' (%s, from %s) on %s: loaded in %.2fs; warmed up at batch sizes %s%s",
            config.name, _LABELS[fmt], source, device, time.perf_counter() - started,
            warmed or "none", f"; CUDA graphs for {runner.graph_buckets}" if params.cuda_graphs
            else "",
        )  # fmt: skip
        instance = TorchInstance(runner, params.cache_cleaning and device.type == "cuda", device)
        instance.kept = kept if isinstance(kept, HostModule) else None
        return instance


def _named_file(version_path: Path, filename: str) -> Path:
    """The model file a host-kept copy came from, without opening it (it may be gone)."""
    if filename:
        return version_path / filename
    for name in DEFAULT_FILENAMES:
        if (version_path / name).exists():
            return version_path / name
    return version_path / DEFAULT_FILENAMES[0]


def _buckets(config: ModelConfig) -> tuple[int, ...]:
    preferred = config.dynamic_batching.preferred_batch_sizes if config.dynamic_batching else ()
    return batch_buckets(config.max_batch_size, preferred)


class TorchInstance:
    """One loaded model on one device; ``execute`` runs a whole batch."""

    def __init__(
        self, runner: DeviceRunner, clean_cache: bool = False, device: torch.device | None = None
    ) -> None:
        self._runner = runner
        self._clean_cache = clean_cache
        self._device = device
        #: the module kept in host memory for the next load (on_demand models)
        self.kept: HostModule | None = None

    def memory_mark(self) -> int | None:
        """Bytes allocated on the CUDA device now, its peak reset (a self-sizing budget's
        probe, ``core/memory_probe.py``); None on the CPU."""
        if self._device is None or self._device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(self._device)
        return int(torch.cuda.memory_allocated(self._device))

    def memory_peak(self) -> int | None:
        """The most allocated on the device since ``memory_mark``."""
        if self._device is None or self._device.type != "cuda":
            return None
        return int(torch.cuda.max_memory_allocated(self._device))

    def execute(self, inputs: Arrays) -> Arrays:
        try:
            return self._runner.run(inputs)
        finally:
            if self._clean_cache:
                torch.cuda.empty_cache()  # Triton's ENABLE_CACHE_CLEANING

    def unload(self) -> None:
        self._runner.close()
        if self.kept is not None:
            self.kept.park()
