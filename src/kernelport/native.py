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
import sys

MODULES = (
    "kernelport.types",
    "kernelport.core.batcher",
    "kernelport.core.dataplane",
    "kernelport.core.fill",
    "kernelport.core.options",
    "kernelport.core.pending",
    "kernelport.core.scheduler",
    "kernelport.core.stats",
    "kernelport.core.validation",
    "kernelport.observability.telemetry",
    "kernelport.protocols.rest.codec",
    "kernelport.protocols.rest.http1",
    "kernelport.protocols.rest.inference",
    "kernelport.protocols.grpc.asgi",
    "kernelport.protocols.grpc.codec",
    "kernelport.protocols.grpc.errors",
    "kernelport.protocols.grpc.h2wire",
    "kernelport.protocols.grpc.http2",
    "kernelport.protocols.grpc.model_infer",
    "kernelport.protocols.grpc.request_reader",
)


def compiled() -> list[str]:
    """The modules of ``MODULES`` imported from compiled extension files."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [
        name
        for name in MODULES
        if (module := sys.modules.get(name)) is not None
        and str(getattr(module, "__file__", "")).endswith(suffixes)
    ]
