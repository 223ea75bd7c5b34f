"""Python backend: a model written as a plain Python class in ``<version>/model.py``.

The class is found by one rule: a module-level name ``Model`` when ``model.py`` defines one,
otherwise the single class *defined in* ``model.py`` that has an ``execute`` method. It is
instantiated with no arguments, then:

``load(config)``                optional; ``config`` is the model's ``ModelConfig``
``execute(inputs) -> outputs``  dict of name -> numpy array, both ways; the whole batch when
                                the model batches (first dim = rows)
``unload()``                    optional; called when the instance is unloaded or the server stops
(decoupled models)              ``execute`` is a generator yielding each response's outputs
``preprocess(inputs)``          optional per-request hooks, exposed on the instance for the
``postprocess(outputs)``        server to run outside the batch
``config()``                    optional static/class method returning ``inputs``, ``outputs``
                                and ``max_batch_size`` for what ``model.yaml`` leaves out

Each instance imports its own copy of ``model.py`` under a unique module name (no
``sys.path`` change, no bytecode written into the repository), so versions and instances never
share module state. Exceptions raised by user code propagate; the server reports them to the
client naming the model and keeps serving.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
import traceback
import types
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kernelport.backends import triton_python
from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.model_config import ModelConfig
from kernelport.errors import ErrorCode, ServerError, invalid

log = logging.getLogger("kernelport.backends.python")

DEFAULT_FILENAME = "model.py"
_CONFIG_KEYS = {"inputs", "outputs", "max_batch_size"}
# Triton's Python backend parameters that mean nothing here, and why. Other parameters are
# the model's own settings (``config.parameters``), so they are not warned about.
_TRITON_NO_EFFECT = {
    "EXECUTION_ENV_PATH": "KernelPort runs model.py in the server's own interpreter, not in "
    "a packed conda environment; install the model's dependencies into the server's "
    "environment",
    "FORCE_CPU_ONLY_INPUT_TENSORS": "inputs always reach execute() as numpy arrays in host memory",
}


def parameter_warnings(parameters: dict[str, Any]) -> list[str]:
    """What the log should say about Triton parameters that do nothing here."""
    return [
        f"parameter {key} has no effect: {_TRITON_NO_EFFECT[key]}"
        for key in sorted(parameters)
        if key in _TRITON_NO_EFFECT
    ]


def _location(exc: BaseException, path: Path) -> str:
    """`` (model.py line N)`` for the deepest frame of ``exc`` inside ``path``, else ``""``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
    return f" ({path.name} line {frames[-1].lineno})" if frames else ""


def import_model_file(path: Path, tag: str) -> types.ModuleType:
    """Execute ``path`` as a fresh module registered under a unique name built from ``tag``.

    The module stays in ``sys.modules`` (dataclasses and pickle look classes up there) until
    :func:`forget_module` removes it.
    """
    if not path.is_file():
        raise ServerError(ErrorCode.NOT_FOUND, f"model file not found: {path}")
    safe = re.sub(r"\W", "_", tag)
    name = f"_kernelport_model_{safe}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        # compile+exec rather than the loader: no __pycache__ written into the repository.
        source = path.read_bytes()
        triton_python.make_importable(source)
        code = compile(source, str(path), "exec")
        exec(code, module.__dict__)
    except BaseException as exc:
        sys.modules.pop(name, None)
        raise invalid(
            f"{path}: importing failed{_location(exc, path)}: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def forget_module(module: types.ModuleType) -> None:
    """Drop a module imported by :func:`import_model_file` from ``sys.modules``."""
    if sys.modules.get(module.__name__) is module:
        del sys.modules[module.__name__]


def find_model_class(module: types.ModuleType, path: Path) -> type:
    """``Model`` if defined, else the one class defined in the module with an ``execute``
    (``TritonPythonModel`` first: a Triton model file may define helper classes too)."""
    named = getattr(module, "Model", None) or getattr(module, triton_python.CLASS_NAME, None)
    if named is not None:
        if not isinstance(named, type):
            raise invalid(f"{path}: 'Model' must be a class, not {type(named).__name__}")
        found = named
    else:
        candidates = [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and value.__module__ == module.__name__
            and callable(getattr(value, "execute", None))
        ]
        if len(candidates) != 1:
            names = ", ".join(c.__name__ for c in candidates) or "none"
            raise invalid(
                f"{path}: expected one class with an execute() method (or a class named "
                f"Model), found {len(candidates)}: {names}"
            )
        found = candidates[0]
    if not callable(getattr(found, "execute", None)):
        raise invalid(f"{path}: class {found.__name__} has no execute() method")
    return found


class PythonBackend:
    """Serves ``model.py`` classes."""

    name = "python"
    platform = "python"

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if raw.get("inputs") and raw.get("outputs"):
            return raw
        path = version_path / (raw.get("default_model_filename") or DEFAULT_FILENAME)
        module = import_model_file(path, f"{raw.get('name', 'model')}_{version_path.name}_config")
        try:
            cls = find_model_class(module, path)
            declare = getattr(cls, "config", None)
            if not callable(declare):
                raise invalid(
                    f"{path}: list inputs and outputs in model.yaml, or give class "
                    f"{cls.__name__} a config() staticmethod returning them"
                )
            try:
                declared = declare()
            except Exception as exc:
                raise invalid(
                    f"{path}: {cls.__name__}.config() failed{_location(exc, path)}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        finally:
            forget_module(module)
        if not isinstance(declared, Mapping) or set(declared) - _CONFIG_KEYS:
            raise invalid(
                f"{path}: {cls.__name__}.config() must return a dict with keys among "
                f"{', '.join(sorted(_CONFIG_KEYS))}"
            )
        out = dict(raw)
        for key, value in declared.items():
            given = key in raw if key == "max_batch_size" else bool(raw.get(key))
            if not given:
                out[key] = value  # model.yaml wins wherever it says something
        return out

    def load(self, context: LoadContext) -> PythonInstance | triton_python.TritonPythonInstance:
        config = context.config
        if context.instance_index == 0:  # once per model load, not per instance
            for warning in parameter_warnings(config.parameters):
                log.warning("model '%s': %s", config.name, warning)
        path = context.version_path / (config.default_model_filename or DEFAULT_FILENAME)
        tag = f"{config.name}_{context.version_path.name}_{context.instance_index}"
        module = import_model_file(path, tag)
        try:
            cls = find_model_class(module, path)
            try:
                if cls.__name__ == triton_python.CLASS_NAME:
                    return triton_python.load(module, context, path)
                user = cls()
                if config.calls:  # a meta model: the models it declared, before load()
                    user.models = context.models
                if callable(getattr(user, "load", None)):
                    user.load(config)
            except Exception as exc:
                raise invalid(
                    f"{path}: {cls.__name__} failed to load{_location(exc, path)}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        except BaseException:
            forget_module(module)
            raise
        if inspect.iscoroutinefunction(user.execute):
            return AsyncPythonInstance(user, module, config)
        has_pre = callable(getattr(user, "preprocess", None))
        has_post = callable(getattr(user, "postprocess", None))
        kind = _INSTANCE_TYPES[(has_pre, has_post)]
        return kind(user, module, config)


class PythonInstance:
    """One user object. Hooks appear as methods only when the user's class defines them."""

    def __init__(self, user: Any, module: types.ModuleType, config: ModelConfig) -> None:
        self._user = user
        self._module = module
        self._config = config

    def execute(self, inputs: Arrays) -> Arrays:
        """Call the user's ``execute`` with the batch and check what it returned."""
        return self._checked(self._user.execute(inputs), "execute", _rows(inputs, self._config))

    def stream(self, inputs: Arrays) -> Iterator[Arrays]:
        """A decoupled model's responses: the user's ``execute`` yields any number of dicts.

        The caller closes the iterator to stop early (the user's generator sees
        GeneratorExit at its ``yield``, so its ``finally`` blocks run)."""
        produced = self._user.execute(inputs)
        if not isinstance(produced, Iterator):
            raise TypeError(
                "a decoupled model's execute() must be a generator (yield each response's "
                f"dict of outputs), got {type(produced).__name__}"
            )
        rows = _rows(inputs, self._config)
        try:
            for result in produced:
                yield self._checked(result, "execute", rows)
        finally:
            close = getattr(produced, "close", None)
            if close is not None:
                close()

    def _checked(self, result: Any, method: str, rows: int | None) -> Arrays:
        if not isinstance(result, Mapping):
            raise TypeError(
                f"{method}() must return a dict of output name -> numpy array, "
                f"got {type(result).__name__}"
            )
        out: Arrays = {}
        for name, value in result.items():
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if rows is not None and (array.ndim == 0 or array.shape[0] != rows):
                raise ValueError(
                    f"{method}() returned output '{name}' with shape {list(array.shape)}, "
                    f"but the batch has {rows} row(s): the first dim must be the batch"
                )
            out[str(name)] = array
        return out

    def _hook(self, method: str, arrays: Arrays) -> Arrays:
        # The server runs hooks outside the instance's worker, so wrap errors here to name
        # the model and the hook the same way execute() errors are named.
        try:
            result = getattr(self._user, method)(arrays)
            return self._checked(result, method, None)
        except ServerError:
            raise
        except Exception as exc:
            raise ServerError(
                ErrorCode.INTERNAL,
                f"model '{self._config.name}' {method} failed: {type(exc).__name__}: {exc}",
            ) from exc

    def unload(self) -> None:
        """Call the user's ``unload`` (errors are logged: shutdown goes on); drop the module."""
        try:
            if callable(getattr(self._user, "unload", None)):
                self._user.unload()
        except Exception:
            log.exception("model '%s': unload() raised", self._config.name)
        finally:
            forget_module(self._module)
            self._user = None


class AsyncPythonInstance(PythonInstance):
    """``async def execute(self, inputs)``: each batch a task on the event loop
    (``core.meta.AsyncWorker``), so a meta model awaits its sub-models without a thread."""

    is_async = True

    async def execute_parts_async(self, parts: list[Arrays], counts: list[int]) -> list[Arrays]:
        inputs = parts[0] if len(parts) == 1 else concat_rows(parts)
        rows = _rows(inputs, self._config)
        outputs = self._checked(await self._user.execute(inputs), "execute", rows)
        if len(parts) == 1:
            return [outputs]
        bounds = np.cumsum([0, *counts])
        return [
            {name: array[bounds[i] : bounds[i + 1]] for name, array in outputs.items()}
            for i in range(len(counts))
        ]

    def execute(self, inputs: Arrays) -> Arrays:
        raise TypeError("execute() is a coroutine: it runs on the event loop")


def concat_rows(parts: list[Arrays]) -> Arrays:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class _Preprocess(PythonInstance):
    def preprocess(self, inputs: Arrays) -> Arrays:
        """The user's per-request ``preprocess`` hook (before batching)."""
        return self._hook("preprocess", inputs)


class _Postprocess(PythonInstance):
    def postprocess(self, outputs: Arrays) -> Arrays:
        """The user's per-request ``postprocess`` hook (after the batch is split)."""
        return self._hook("postprocess", outputs)


class _PrePostprocess(_Preprocess, _Postprocess):
    pass


_INSTANCE_TYPES: dict[tuple[bool, bool], type[PythonInstance]] = {
    (False, False): PythonInstance,
    (True, False): _Preprocess,
    (False, True): _Postprocess,
    (True, True): _PrePostprocess,
}


def _rows(inputs: Arrays, config: ModelConfig) -> int | None:
    if not config.batching or not inputs:
        return None
    return int(next(iter(inputs.values())).shape[0])
