"""Which modules of the request path can be compiled to C with mypyc, and which are.

The per-request work of a front end is spread over a few hundred small Python calls (decode,
validation, the queue, statistics, encode): no single one is worth rewriting natively, but
compiling the typed modules they live in with mypyc (the compiler mypy itself ships as) runs
the same source with C calls, attribute slots and unboxed locals. ``scripts/compile.sh DIR``
builds a copy of the package with these modules compiled; putting ``DIR`` first on
``PYTHONPATH`` serves from it (extension modules win over ``.py`` files of the same name).
Nothing else changes: the source is the same, and a module that is not compiled runs as
Python.

A module qualifies when it is on the hot path, passes ``mypy --strict`` (all of KernelPort
does) and uses nothing mypyc does not compile (async generators, for example, keep
``core/dataplane.py`` out, and the gRPC calls that stream live in
``protocols/grpc/streams.py`` so that the unary path in ``asgi.py`` compiles). Compiled
code checks declared types at run time: a value of the wrong type passed across a compiled
function's boundary raises ``TypeError`` where Python would have carried on.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

MODULES = (
    "kernelport.types",
    "kernelport.core.batcher",
    "kernelport.core.dataplane",
    "kernelport.core.fill",
    "kernelport.core.options",
    "kernelport.core.pending",
    "kernelport.core.placement",
    "kernelport.core.scheduler",
    "kernelport.core.stats",
    "kernelport.core.validation",
    "kernelport.core.wire",
    "kernelport.observability.telemetry",
    "kernelport.protocols.rest.codec",
    "kernelport.protocols.rest.http1",
    "kernelport.protocols.rest.inference",
    "kernelport.protocols.grpc.asgi",
    "kernelport.protocols.grpc.codec",
    "kernelport.protocols.grpc.errors",
    "kernelport.protocols.grpc.h2stream",
    "kernelport.protocols.grpc.h2wire",
    "kernelport.protocols.grpc.http2",
    "kernelport.protocols.grpc.model_infer",
    "kernelport.protocols.grpc.request_reader",
    "kernelport.worker.main",
)


def compiled() -> list[str]:
    """The modules of ``MODULES`` that run compiled: imported from compiled extension files,
    or, not imported here, that an import would find as one (the worker's loop runs in
    worker processes, which inherit the server's ``sys.path``)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [name for name in MODULES if _origin(name).endswith(suffixes)]


def _origin(name: str) -> str:
    module = sys.modules.get(name)
    if module is not None:
        return str(getattr(module, "__file__", ""))
    spec = importlib.util.find_spec(name)
    return str(spec.origin) if spec is not None and spec.origin else ""
