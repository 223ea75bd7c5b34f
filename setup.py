"""Only for the compiled build: ``KERNELPORT_COMPILE=1 pip wheel --no-build-isolation .`` (with
mypy installed) compiles the request-path modules ``src/kernelport/native.py`` lists with
mypyc into the wheel. Without the variable this adds nothing: every other setting is in
pyproject.toml, and the wheel is pure Python."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from setuptools import setup


def _native_modules() -> list[str]:
    """MODULES from src/kernelport/native.py, read without importing the package."""
    tree = ast.parse(Path("src/kernelport/native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MODULES" for t in node.targets
        ):
            return [str(v) for v in ast.literal_eval(node.value)]
    raise RuntimeError("src/kernelport/native.py defines no MODULES")


ext_modules = []
if os.environ.get("KERNELPORT_COMPILE") == "1":
    from mypyc.build import mypycify

    files = ["src/" + name.replace(".", "/") + ".py" for name in _native_modules()]
    ext_modules = mypycify(["--ignore-missing-imports", *files], opt_level="3")

setup(ext_modules=ext_modules)
