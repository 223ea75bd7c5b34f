"""The compiled request path (``kernelport/native.py``, ``scripts/compile.sh``): the listed
modules exist as typed sources, and a test pass is what it says it is. ``make test`` runs the
suite from the sources (coverage needs them), then a second pass of the request-path tests
from a compiled copy with ``KERNELPORT_EXPECT_COMPILED=1``: there every listed module must be
the compiled one, in this process and in the servers the tests start."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

from conftest import RunningServer

import kernelport
from kernelport import native

EXPECT_COMPILED = os.environ.get("KERNELPORT_EXPECT_COMPILED") == "1"


def test_every_listed_module_is_a_typed_source_module() -> None:
    package = Path(kernelport.__file__).parent
    for name in native.MODULES:
        relative = Path(*name.split(".")[1:]).with_suffix(".py")
        assert (package / relative).exists(), name  # the compiled copy keeps its sources
        importlib.import_module(name)
    assert len(set(native.MODULES)) == len(native.MODULES)


def test_this_pass_runs_the_modules_it_should() -> None:
    for name in native.MODULES:
        importlib.import_module(name)
    assert native.compiled() == (list(native.MODULES) if EXPECT_COMPILED else [])


def test_the_server_reports_what_it_runs(demo_server: RunningServer) -> None:
    found = re.search(r"request path: (\d+) of (\d+) modules compiled", demo_server.log())
    assert found is not None, demo_server.log()
    expected = len(native.MODULES) if EXPECT_COMPILED else 0
    assert (int(found[1]), int(found[2])) == (expected, len(native.MODULES))
